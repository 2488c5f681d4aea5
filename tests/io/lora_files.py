"""Random LoRA adapters written in each outside format (test helpers, shared by the LoRA tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vidmoe.io import keymaps

BLOCK_LINEARS = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "ffn.0",
    "ffn.2",
)


def random_lora(expert, *, rank=4, alpha=6.0, seed=0, diff_b=False, extra=()):
    """Release module name -> {'A', 'B', 'alpha', optional 'diff_b'} for every block linear."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(expert.named_modules())
    names = [f"blocks.{i}.{m}" for i in range(len(expert.blocks)) for m in BLOCK_LINEARS]
    out = {}
    for name in [*names, *extra]:
        w = modules[name].weight
        # diffusers reads no alpha outside the blocks: the extra modules get none (scale 1)
        entry = {
            "A": torch.randn(rank, w.shape[1], generator=g) * 0.2,
            "B": torch.randn(w.shape[0], rank, generator=g) * 0.2,
            "alpha": None if name in extra else alpha,
        }
        if diff_b:
            entry["diff_b"] = torch.randn(w.shape[0], generator=g) * 0.05
        out[name] = entry
    return out


def merged_delta(entry, strength=1.0):
    """(weight delta, bias delta) of one module at `strength`."""
    a, b = entry["A"], entry["B"]
    dw = (b @ a) * (1.0 if entry["alpha"] is None else entry["alpha"] / a.shape[0])
    if "diff" in entry:
        dw = dw + entry["diff"]
    return strength * dw, strength * entry["diff_b"] if "diff_b" in entry else None


def write_release(path: Path, lora, *, prefix="diffusion_model.", down="lora_down", up="lora_up"):
    sd = {}
    for name, e in lora.items():
        k = prefix + name
        sd[f"{k}.{down}.weight"], sd[f"{k}.{up}.weight"] = e["A"], e["B"]
        if e["alpha"] is not None:
            sd[f"{k}.alpha"] = torch.tensor(float(e["alpha"]))
        for extra in ("diff", "diff_b"):
            if extra in e:
                sd[f"{k}.{extra}"] = e[extra]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def write_kohya(path: Path, lora):
    sd = {}
    for name, e in lora.items():
        k = "lora_unet_" + name.replace(".", "_")
        sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = e["A"], e["B"]
        sd[f"{k}.alpha"] = torch.tensor(float(e["alpha"]))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def write_diffusers(path: Path, loras: dict[str, dict], *, with_alpha=True):
    """loras: prefix ('transformer.' / 'transformer_2.' / '') -> lora; alpha in peft metadata."""
    sd, alphas, ranks, pattern = {}, set(), set(), {}
    for prefix, lora in loras.items():
        for name, e in lora.items():
            mod = keymaps.transformer_to_diffusers(name + ".weight").removesuffix(".weight")
            k = prefix + mod
            sd[f"{k}.lora_A.weight"], sd[f"{k}.lora_B.weight"] = e["A"], e["B"]
            if "diff_b" in e:
                sd[f"{k}.lora_B.bias"] = e["diff_b"]
            if e["alpha"] is None:
                pattern[mod] = e["A"].shape[0]  # scale 1
            else:
                alphas.add(float(e["alpha"]))
            ranks.add(e["A"].shape[0])
    meta = {"format": "pt"}
    if with_alpha:
        (alpha,), (rank,) = alphas, ranks
        targets = sorted(
            {k.split(".", 1)[1].rsplit(".lora_", 1)[0] for k in sd if k.startswith("transformer")}
        )
        cfg = {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": targets,
            "alpha_pattern": pattern,
            "lora_bias": any(k.endswith("lora_B.bias") for k in sd),
        }
        meta["lora_adapter_metadata"] = json.dumps({f"transformer.{k}": v for k, v in cfg.items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    return path
