"""Peak memory of the causal VAE decode, derived from the decoder's architecture (no fitted
constant): the decoder is walked module by module on the meta device, stage by stage (each
level's width x its spatial size x the chunk's frames), counting what each layer allocates
while its input is still held, the causal cache every layer keeps between chunks, the decoded
pieces gathered so far, and the clip assembled and clamped at the end.

The convolutions dominate, and what they allocate depends on the kernel torch picks for a
float32 CPU convolution (torch 2.x, `ConvParams::use_mkldnn`): oneDNN when N*C*D*H of the input
exceeds 20480 (reorders of the input and output to its blocked layout), else the native kernel,
whose vol2col/im2col buffer holds C_in x kernel volume x output positions (27x a 3x3x3 conv's
input; skipped for 1x1 kernels).

Shape legend: B batch, C channels, T frames, H height, W width (the walk carries (B, C, T, H, W)).
"""

from __future__ import annotations

import math

from torch import nn

F32 = 4
MKLDNN_MIN_INPUT = 20480
"""torch runs a float32 CPU convolution by oneDNN when N*C*D*H (N*C*H*W in 2D) exceeds this."""

Shape = tuple[int, ...]


def _bytes(shape: Shape) -> int:
    return math.prod(shape) * F32


def conv_extra_bytes(
    inp: Shape, out: Shape, kernel: Shape, *, threads: int = 1, device: str = "cpu"
) -> int:
    """What a float32 convolution allocates besides its output, for its input `inp` (already
    padded) and output `out`, both (N, C, [D,] H, W). On CUDA: 0 (cuDNN's workspace is not
    modelled; not yet measured on a GPU)."""
    if device != "cpu":
        return 0
    is_1x1 = all(k == 1 for k in kernel)
    if (not is_1x1 or threads > 1) and math.prod(inp[:4]) > MKLDNN_MIN_INPUT:
        return _bytes(inp) + _bytes(out)  # oneDNN: input and output reordered (blocked layout)
    if is_1x1:
        return 0  # the native kernel multiplies the input as it is
    return out[0] * inp[1] * math.prod(kernel) * math.prod(out[2:]) * F32  # the column buffer


class DecodeWalk:
    """One walk of the decoder over a chunk: peak bytes above the chunk's input, and the
    bytes of causal cache its layers keep."""

    def __init__(self, *, first_chunk: bool, threads: int = 1, device: str = "cpu"):
        self.first = first_chunk
        self.threads, self.device = threads, device
        self.cache = 0

    def run(self, m: nn.Module, x: Shape) -> tuple[Shape, int]:
        """(output shape, peak bytes allocated while `m` runs on input shape `x`, output
        included; the input, held by the caller, is not)."""
        from vidmoe.models.vae_blocks import (
            AttentionBlock,
            CausalConv3d,
            Resample,
            ResidualBlock,
            RMSNorm,
            UpLevel,
        )

        if isinstance(m, nn.Sequential):
            return self.sequence(list(m), x)
        if isinstance(m, CausalConv3d):
            return self.causal_conv(m, x)
        if isinstance(m, RMSNorm):  # F.normalize, then * scale, * gamma: two full copies at once
            return x, 2 * _bytes(x)
        if isinstance(m, nn.SiLU):
            return x, _bytes(x)
        if isinstance(m, nn.Identity):
            return x, 0
        if isinstance(m, ResidualBlock):
            return self.residual(m, x)
        if isinstance(m, AttentionBlock):  # per frame: layout copies, q/k/v, scores, output
            return x, 8 * _bytes(x) + 2 * x[0] * x[2] * (x[3] * x[4]) ** 2 * F32
        if isinstance(m, Resample):
            return self.resample(m, x)
        if isinstance(m, UpLevel):
            return self.up_level(m, x)
        raise TypeError(f"no memory model for {type(m).__name__} in the VAE decoder")

    def sequence(self, layers: list[nn.Module], x: Shape) -> tuple[Shape, int]:
        """Layers in a row: each one's peak on top of the previous output (freed after)."""
        held, peak = 0, 0
        for layer in layers:
            x, p = self.run(layer, x)
            peak, held = max(peak, held + p), _bytes(x)
        return x, max(peak, held)

    def causal_conv(self, m: nn.Module, x: Shape) -> tuple[Shape, int]:
        b, c, t, h, w = x
        hist = m.history
        prev = 0 if self.first else hist  # frames the cache adds in front
        self.cache += b * c * min(hist, t + prev) * h * w * F32
        pw, _, ph, _ = m.pad_hw
        padded = (b, c, t + hist, h + 2 * ph, w + 2 * pw)
        (kt, kh, kw), (st, sh, sw) = m.kernel_size, m.stride
        out = (
            b,
            m.out_channels,
            (padded[2] - kt) // st + 1,
            (padded[3] - kh) // sh + 1,
            (padded[4] - kw) // sw + 1,
        )
        cat = _bytes((b, c, t + prev, h, w)) if prev else 0
        extra = conv_extra_bytes(
            padded, out, m.kernel_size, threads=self.threads, device=self.device
        )
        pad = _bytes(padded) if hist or ph or pw else 0
        return out, max(cat + pad, pad + extra + _bytes(out))

    def residual(self, m: nn.Module, x: Shape) -> tuple[Shape, int]:
        y, p_res = self.run(m.residual, x)
        sc, p_sc = self.run(m.shortcut, x)
        sc_bytes = 0 if isinstance(m.shortcut, nn.Identity) else _bytes(sc)
        r = _bytes(y)
        return y, max(p_res, r + p_sc, r + sc_bytes + r)

    def resample(self, m: nn.Module, x: Shape) -> tuple[Shape, int]:
        """Upsampling: the time conv doubles the frames (not in the stream's first chunk), then
        per frame a 2x nearest upsample and a 3x3 conv; each rearrange is a copy."""
        b, c, t, h, w = x
        peak = 0
        if m.mode == "upsample3d" and not self.first:
            y, p = self.run(m.time_conv, x)  # (B, 2C, T, H, W)
            peak = max(p, 3 * _bytes(y))  # its output, the interleaved copy, the cat
            t = 2 * t
        elif m.mode == "upsample3d":
            peak = _bytes(x)  # the cat of the first frame
        if not m.mode.startswith("up"):
            raise TypeError(f"no memory model for a {m.mode} Resample in the decoder")
        frames = (b * t, c, h, w)
        up = (b * t, c, 2 * h, 2 * w)
        conv = m.resample[1]
        out = (b * t, conv.out_channels, 2 * h, 2 * w)
        padded = (b * t, c, 2 * h + 2, 2 * w + 2)
        extra = conv_extra_bytes(
            padded, out, conv.kernel_size, threads=self.threads, device=self.device
        )
        steps = [
            _bytes(frames) * 2,  # the (b f) copy beside its source
            _bytes(frames) + _bytes(up),
            _bytes(up) + extra + _bytes(out),
            2 * _bytes(out),  # the copy back to (B, C', T, H, W)
        ]
        return (b, conv.out_channels, t, 2 * h, 2 * w), max(peak, *steps)

    def up_level(self, m: nn.Module, x: Shape) -> tuple[Shape, int]:
        """A 2.2 level: its blocks, plus a shortcut that repeats and unfolds the input."""
        y, p = self.run(m.upsamples, x)
        if m.avg_shortcut is None:
            return y, p
        return y, max(p, 3 * _bytes(y))  # y, the repeated input unfolded (a copy), their sum


def decode_peak_bytes(
    vae: nn.Module, *, frames: int, height: int, width: int, device: str = "cpu"
) -> dict[str, int]:
    """Peak bytes of `WanVAE.decode` (float32, batch 1, the release's chunk schedule) of latents
    for a clip of `frames` x `height` x `width`, with its parts.

    Args:
        vae: a `WanVAE` (built on the meta device: only its modules are read).
        device: 'cpu' (torch's CPU convolution buffers counted) or 'cuda'.
    Returns:
        {"peak", "chunk", "cache", "clip"}: the peak; the largest chunk's own peak; the causal
        cache held between chunks; the decoded clip in float32.
    """
    cfg = vae.config
    lat = (1, cfg.z_dim, 1, height // cfg.spatial_stride, width // cfg.spatial_stride)
    num_chunks = (frames - 1) // cfg.temporal_stride + 1
    clip = 3 * frames * height * width * F32
    peak, chunk, cache = 0, 0, 0
    for first in (True, False)[: min(num_chunks, 2)]:
        walk = DecodeWalk(first_chunk=first, device=device)
        z, p_conv2 = walk.run(vae.conv2, lat)
        d = vae.decoder
        out, p_dec = walk.sequence([d.conv1, d.middle, d.upsamples, d.head], z)
        chunk = max(chunk, p_dec + _bytes(z), p_conv2)
        cache = max(cache, walk.cache)
        before = 0 if first else clip - _bytes(out)  # pieces decoded before the last chunk
        peak = max(peak, walk.cache + before + p_dec + _bytes(z))
    end = cache + 3 * clip  # the pieces, their concatenation and the clamped clip
    return {"peak": max(peak, end), "chunk": chunk, "cache": cache, "clip": clip}
