"""Golden parity of the causal VAE against the release's WanVAE_ (kinds `vae2_1`, `vae2_2`).

The golden `scale.std` is the std itself (the reference was called with [mean, 1/std]).
Note: the golden `output.decoded` is the reference's raw decode, not clamped (its values pass
+-1), so it is compared with `decode(..., clamp=False)`, and clamped against clamped.
"""

import json

import torch
from safetensors.torch import load_file

from vidmoe.config import VAEConfig
from vidmoe.models.vae import WanVAE

CONFIG_KEYS = ("dim", "dec_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def check_vae(path, meta):
    generation = {"vae2_1": "2.1", "vae2_2": "2.2"}[meta["kind"]]
    raw = json.loads(meta["config"])
    cfg = VAEConfig(generation=generation, **{k: raw[k] for k in CONFIG_KEYS if k in raw})
    tensors = load_file(str(path))
    weights = {k[len("weight.") :]: v for k, v in tensors.items() if k.startswith("weight.")}
    model = WanVAE(cfg).eval()
    model.load_state_dict(weights, strict=True)
    scale = (tensors["scale.mean"], tensors["scale.std"])
    golden_latent, golden_video = tensors["output.latent"], tensors["output.decoded"]
    with torch.no_grad():
        latent = model.encode(tensors["input.video"], scale=scale)
        raw_video = model.decode(golden_latent, scale=scale, clamp=False)
        video = model.decode(golden_latent, scale=scale)
    checks = {
        "latent": (latent, golden_latent),
        "decoded (raw)": (raw_video, golden_video),
        "decoded (clamped)": (video, golden_video.clamp(-1, 1)),
    }
    for name, (ours, ref) in checks.items():
        assert ours.shape == ref.shape, f"{path.name}: {name} shape {ours.shape} != {ref.shape}"
        err = rel_err(ours, ref)
        assert err <= 1e-4, f"{path.name}: {name} relative error {err:.2e} > 1e-4"


CHECKS = {"vae2_1": check_vae, "vae2_2": check_vae}
