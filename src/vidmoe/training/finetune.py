"""Fine-tuning: experts that start from a released or trained model (`TrainConfig.init`), fully or
with one peft LoRA adapter per expert (`TrainConfig.lora`, a `LoraTrainConfig`).

With LoRA the base weights are frozen and only the adapters are optimised, averaged and
checkpointed (the base is re-read from `init` on resume). Each checkpoint also writes the adapters
as `lora/<expert>/adapter_model.safetensors` + `adapter_config.json` (peft's layout) and
`lora/diffusers_lora.safetensors` (diffusers' Wan layout, `transformer.` / `transformer_2.`); the
EMA adapters go to `lora_ema/` in the same layout. The functions here take the pieces they use
(experts, architectures, the `[lora]` settings); `vidmoe.training.loop` calls them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vidmoe.config import TransformerConfig
from vidmoe.models.transformer import WanTransformer
from vidmoe.training.config import DEFAULT_LORA_TARGETS, LoraTrainConfig

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "adapter_tensors",
    "add_lora",
    "check_same_architecture",
    "is_lora",
    "load_init_experts",
    "load_trainable_state",
    "lora_config",
    "save_lora_adapters",
    "trainable_state",
]

LORA_DIR, LORA_EMA_DIR = "lora", "lora_ema"
ADAPTER_FILE, ADAPTER_CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
DIFFUSERS_FILE = "diffusers_lora.safetensors"
DIFFUSERS_PREFIXES = ("transformer.", "transformer_2.")  # by expert position, noisiest first
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before module names
ADAPTER_NAME = "default"


def lora_config(lora: LoraTrainConfig):
    """The peft `LoraConfig` of a run's `[lora]` settings (alpha defaults to the rank: scale 1)."""
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ImportError("LoRA fine-tuning needs peft: pip install 'vidmoe[train]'") from e
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.scale_alpha,
        target_modules=list(lora.targets),
        lora_dropout=lora.dropout,
        bias="none",
    )


# -- building the experts ------------------------------------------------------------------------
def load_init_experts(
    init: str, architectures: Mapping[str, TransformerConfig]
) -> dict[str, WanTransformer]:
    """Each expert of `architectures` (name -> its architecture) built on meta and filled (fp32,
    all parameters trainable) from the model at `init`, whose experts must have that
    architecture."""
    from vidmoe.io.checkpoints import detect_layout, load_into

    layout = detect_layout(init)
    missing = [n for n in architectures if n not in layout.experts]
    if missing:
        raise ValueError(
            f"init {init} has experts {list(layout.experts)}, not {missing}: train experts "
            f"with the same names (moe.expert_names) as the init model"
        )
    experts = {}
    for name, want in architectures.items():
        check_same_architecture(want, layout.config.transformer_for(name), name, init)
        with torch.device("meta"):
            expert = WanTransformer(want)
        load_into(expert, layout.expert_tensors(name), device="cpu")
        experts[name] = expert.float().requires_grad_(True)
    return experts


def check_same_architecture(want, have, name: str, init: str) -> None:
    """Raise a ValueError naming every TransformerConfig field where `have` differs from `want`."""
    diff = [
        f.name for f in dataclasses.fields(want) if getattr(want, f.name) != getattr(have, f.name)
    ]
    if diff:
        detail = ", ".join(f"{f}={getattr(want, f)!r} (init: {getattr(have, f)!r})" for f in diff)
        raise ValueError(
            f"expert {name!r} of init {init} differs from the train config's transformer in "
            f"{detail}: set these fields in [transformer] to the init model's values"
        )


def add_lora(expert: nn.Module, lora: LoraTrainConfig) -> None:
    """Inject a peft LoRA adapter into `expert` in place; only its A/B matrices stay trainable."""
    from peft import inject_adapter_in_model

    names = [n for n, _ in expert.named_modules()]
    unmatched = [t for t in lora.targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        linears = sorted(
            {
                n.split(".", 2)[-1]
                for n, m in expert.named_modules()
                if isinstance(m, nn.Linear) and n.startswith("blocks.0.")
            }
        )
        raise ValueError(
            f"[lora] targets {unmatched} match no module of the expert; block modules: {linears}"
        )
    inject_adapter_in_model(lora_config(lora), expert, adapter_name=ADAPTER_NAME)
    for n, p in expert.named_parameters():
        p.requires_grad_(".lora_A." in n or ".lora_B." in n)


# -- checkpoint state ----------------------------------------------------------------------------
def is_lora(expert: nn.Module) -> bool:
    return any(not p.requires_grad for p in expert.parameters())


def trainable_state(expert: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of an expert: its state_dict, or with LoRA the adapters only."""
    if not is_lora(expert):
        return expert.state_dict()
    return {n: p.detach() for n, p in expert.named_parameters() if p.requires_grad}


def load_trainable_state(expert: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Inverse of `trainable_state`; a LoRA checkpoint must hold exactly the adapter tensors."""
    if not is_lora(expert):
        expert.load_state_dict(state)
        return
    want = {n for n, p in expert.named_parameters() if p.requires_grad}
    if set(state) != want:
        extra, lack = sorted(set(state) - want), sorted(want - set(state))
        raise ValueError(
            f"the checkpoint does not fit this LoRA run (extra {extra[:3]}, missing {lack[:3]}): "
            "was it written with another [lora] rank or targets? use a new out_dir"
        )
    expert.load_state_dict(state, strict=False)


# -- adapter files -------------------------------------------------------------------------------
def adapter_tensors(expert: nn.Module, shadow: Mapping[str, torch.Tensor] | None = None):
    """Module name (release) -> (lora_A (R, I), lora_B (O, R)) of a peft-injected expert."""
    source = shadow if shadow is not None else dict(expert.named_parameters())
    suffix = f".lora_A.{ADAPTER_NAME}.weight"
    out = {}
    for n in source:
        if n.endswith(suffix):
            module = n.removesuffix(suffix)
            b = source[f"{module}.lora_B.{ADAPTER_NAME}.weight"]
            out[module] = (source[n].detach().float().cpu(), b.detach().float().cpu())
    return out


def _peft_metadata(lora: LoraTrainConfig, modules: list[str]) -> dict[str, Any]:
    """The LoraConfig fields diffusers and vidmoe read from `lora_adapter_metadata`."""
    return {
        "r": lora.rank,
        "lora_alpha": lora.scale_alpha,
        "target_modules": sorted(modules),
        "lora_dropout": lora.dropout,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
    }


def save_lora_adapters(
    experts: Mapping[str, nn.Module],
    folder: Path,
    *,
    lora: LoraTrainConfig,
    expert_names: tuple[str, ...],
    init: str = "",
    shadows: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Write each trained expert's adapter in peft's layout and all of them in diffusers' layout.

    Args:
        experts: the trained, peft-injected experts by name.
        folder: where to write (a run writes `<out_dir>/lora`, and `lora_ema` for the EMA).
        lora: the run's `[lora]` settings.
        expert_names: every expert of the model, noisiest first (a diffusers prefix each).
        init: the base model's path, recorded in adapter_config.json.
        shadows: per expert, EMA tensors to write in place of the experts' own.
    Returns:
        `folder`, holding `<expert>/adapter_model.safetensors` + `adapter_config.json` and
        `diffusers_lora.safetensors`, each written atomically.
    """
    from vidmoe.io.atomic import save_safetensors_atomic, write_text_atomic
    from vidmoe.io.keymaps import transformer_to_diffusers

    names = expert_names
    if len(names) > len(DIFFUSERS_PREFIXES):
        raise ValueError(f"the diffusers Wan layout holds at most 2 experts; this run has {names}")
    folder = Path(folder)
    combined: dict[str, torch.Tensor] = {}
    targets: dict[str, list[str]] = {}  # diffusers prefix -> diffusers module names
    for name, expert in experts.items():
        pairs = adapter_tensors(expert, shadows[name] if shadows is not None else None)
        tensors = {}
        for module, (a, b) in pairs.items():
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
        # vidmoe reads the alpha from this metadata; peft reads it from adapter_config.json
        peft_meta = json.dumps(_peft_metadata(lora, list(pairs)))
        save_safetensors_atomic(
            tensors,
            folder / name / ADAPTER_FILE,
            metadata={"format": "pt", "lora_adapter_metadata": peft_meta},
        )
        write_text_atomic(_adapter_config_json(lora, init), folder / name / ADAPTER_CONFIG_FILE)

        prefix = DIFFUSERS_PREFIXES[names.index(name)]
        targets[prefix] = []
        for module, (a, b) in pairs.items():
            dname = transformer_to_diffusers(module + ".weight").removesuffix(".weight")
            combined[f"{prefix}{dname}.lora_A.weight"] = a
            combined[f"{prefix}{dname}.lora_B.weight"] = b
            targets[prefix].append(dname)
    # diffusers reads each prefix's LoraConfig; all experts of a run share r and alpha, so the
    # experts not trained here get one too (vidmoe reads the `transformer.` one)
    trained = sorted({m for mods in targets.values() for m in mods})
    meta = {
        f"{prefix}{k}": v
        for prefix in DIFFUSERS_PREFIXES[: len(names)]
        for k, v in _peft_metadata(lora, targets.get(prefix, trained)).items()
    }
    save_safetensors_atomic(
        combined,
        folder / DIFFUSERS_FILE,
        metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)},
    )
    return folder


def _adapter_config_json(lora: LoraTrainConfig, init: str) -> str:
    d = lora_config(lora).to_dict()
    d["base_model_name_or_path"] = init or None
    d["inference_mode"] = True
    return json.dumps({k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}, indent=2)
