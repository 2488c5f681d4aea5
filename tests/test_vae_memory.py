"""The VAE decode's memory model: walking the decoder's architecture gives the peak of the
tensors a real decode holds (its convolution buffers counted by the same rule), for both VAE
generations, and the kernel rule follows torch's choice of convolution."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vidmoe.config import VAEConfig
from vidmoe.models.vae import WanVAE
from vidmoe.vae_memory import conv_extra_bytes, decode_peak_bytes


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that tensors created under the mode keep alive, and their peak
    (plus each convolution's buffers while it runs)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.refs = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._hold(t)
        extra = 0
        if func is torch.ops.aten.convolution.default:
            kernel = tuple(args[1].shape[2:])
            extra = conv_extra_bytes(tuple(args[0].shape), tuple(out.shape), kernel)
        self.peak = max(self.peak, self.live + extra)
        return out

    def _hold(self, t):
        key = t.untyped_storage()._cdata
        if key not in self.refs:
            self.refs[key] = [0, t.untyped_storage().nbytes()]
            self.live += self.refs[key][1]
        self.refs[key][0] += 1
        weakref.finalize(t, self._drop, key)

    def _drop(self, key):
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]


VAES = {
    "2.1": VAEConfig(generation="2.1", dim=16, z_dim=16, num_res_blocks=1),
    "2.2": VAEConfig(generation="2.2", dim=16, dec_dim=16, z_dim=48, num_res_blocks=1),
}


@pytest.mark.parametrize("generation", sorted(VAES))
def test_walk_predicts_the_live_peak_of_a_real_decode(generation):
    torch.manual_seed(0)
    cfg = VAES[generation]
    vae = WanVAE(cfg).eval()
    frames, height, width = 9, 64, 64
    s = cfg.spatial_stride
    latent = torch.randn(1, cfg.z_dim, (frames - 1) // 4 + 1, height // s, width // s)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernel rule for 1x1 convolutions depends on the threads
    mode = LiveBytes()
    try:
        with torch.no_grad(), mode:
            vae.decode(latent)
    finally:
        torch.set_num_threads(threads)
    with torch.device("meta"):
        meta = WanVAE(cfg)
    predicted = decode_peak_bytes(meta, frames=frames, height=height, width=width)["peak"]
    assert abs(predicted - mode.peak) <= 0.05 * mode.peak, (predicted, mode.peak)


def test_conv_buffers_follow_torchs_kernel_choice():
    # native kernel below 20480 input elements over (N, C, D, H): a 27x column buffer
    assert conv_extra_bytes((1, 24, 6, 130, 130), (1, 24, 4, 128, 128), (3, 3, 3)) == (
        24 * 27 * 4 * 128 * 128 * 4
    )
    # oneDNN above it: the input and output reordered, no columns
    inp, out = (1, 32, 6, 130, 130), (1, 32, 4, 128, 128)
    assert conv_extra_bytes(inp, out, (3, 3, 3)) == 4 * (32 * 6 * 130 * 130 + 32 * 4 * 128 * 128)
    assert conv_extra_bytes((1, 24, 4, 8, 8), (1, 48, 4, 8, 8), (1, 1, 1)) == 0
