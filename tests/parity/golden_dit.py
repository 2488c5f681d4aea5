"""Golden parity of the expert transformer against the release's WanModel (kind `dit`)."""

import json

import torch
from safetensors.torch import load_file

from vidmoe.config import TransformerConfig
from vidmoe.models.transformer import WanTransformer


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def check_dit(path, meta):
    cfg = TransformerConfig.from_dict(json.loads(meta["config"]))
    tensors = load_file(str(path))
    weights = {k[len("weight.") :]: v for k, v in tensors.items() if k.startswith("weight.")}
    model = WanTransformer(cfg).eval()
    missing, unexpected = model.load_state_dict(weights, strict=True), None
    del missing, unexpected
    batch = len([k for k in tensors if k.startswith("input.x.")])
    x = torch.stack([tensors[f"input.x.{i}"] for i in range(batch)])
    y = None
    if "input.y.0" in tensors:
        y = torch.stack([tensors[f"input.y.{i}"] for i in range(batch)])
    context = [tensors[f"input.context.{i}"] for i in range(batch)]
    t = tensors["input.t"]
    if t.dim() == 1 and t.numel() == 1 and batch > 1:
        t = t.expand(batch)
    with torch.no_grad():
        out = model(x, t.double() / 1000, context, y=y)
    for i in range(batch):
        err = rel_err(out[i], tensors[f"output.{i}"])
        assert err <= 1e-4, f"{path.name}: sample {i} relative error {err:.2e} > 1e-4"


CHECKS = {"dit": check_dit}
