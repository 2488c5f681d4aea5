"""Fine-tuning: experts that start from a released or trained model (`TrainConfig.init`), fully or
with one peft LoRA adapter per expert (`TrainConfig.lora_rank`).

With LoRA the base weights are frozen and only the adapters are optimised, averaged and
checkpointed (the base is re-read from `init` on resume). Each checkpoint also writes the adapters
as `lora/<expert>/adapter_model.safetensors` + `adapter_config.json` (peft's layout) and
`lora/diffusers_lora.safetensors` (diffusers' Wan layout, `transformer.` / `transformer_2.`); the
EMA adapters go to `lora_ema/` in the same layout.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vidmoe.models.transformer import WanTransformer

if TYPE_CHECKING:
    from vidmoe.training.config import TrainConfig
    from vidmoe.training.loop import Trainer

# Release module names: the attention q/k/v/o and FFN linears of every block (peft matches a
# target against the end of a module name).
DEFAULT_LORA_TARGETS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "ffn.0", "ffn.2",
)  # fmt: skip
LORA_DIR, LORA_EMA_DIR = "lora", "lora_ema"
ADAPTER_FILE, ADAPTER_CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
DIFFUSERS_FILE = "diffusers_lora.safetensors"
DIFFUSERS_PREFIXES = ("transformer.", "transformer_2.")  # by expert position, noisiest first
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before module names
ADAPTER_NAME = "default"


def check_finetune_config(cfg: TrainConfig) -> None:
    """Validate (and normalise) the fine-tuning fields of a TrainConfig."""
    object.__setattr__(cfg, "lora_targets", tuple(cfg.lora_targets))
    if cfg.lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0 (0: full fine-tuning); got {cfg.lora_rank}")
    if cfg.lora_alpha < 0:
        raise ValueError(f"lora_alpha must be >= 0 (0: equal to lora_rank); got {cfg.lora_alpha}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1); got {cfg.lora_dropout}")
    if cfg.lora_rank and not cfg.lora_targets:
        raise ValueError(
            f"lora_targets is empty; name module suffixes such as {list(DEFAULT_LORA_TARGETS[:3])}"
        )


def lora_config(cfg: TrainConfig):
    """The peft `LoraConfig` of a run (alpha defaults to the rank: scale 1)."""
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ImportError("LoRA fine-tuning needs peft: pip install 'vidmoe[train]'") from e
    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha or cfg.lora_rank,
        target_modules=list(cfg.lora_targets),
        lora_dropout=cfg.lora_dropout,
        bias="none",
    )


# -- building the experts ------------------------------------------------------------------------
def build_finetune_experts(cfg: TrainConfig) -> dict[str, WanTransformer]:
    """The trained experts of a run with `init` and/or LoRA, seeded by `cfg.seed`.

    Experts start from `cfg.init` (fp32, all parameters trainable) or, without one, fresh as in
    `build_experts`; with `lora_rank > 0` each gets a peft adapter and its base is frozen.
    """
    torch.manual_seed(cfg.seed)
    if cfg.init:
        experts = load_init_experts(cfg)
    else:
        experts = {n: WanTransformer(cfg.transformer_for(n)) for n in cfg.trained_experts}
    for expert in experts.values():
        expert.train().use_checkpointing = cfg.use_checkpointing
        if cfg.lora_rank:
            add_lora(expert, cfg)
    return experts


def load_init_experts(cfg: TrainConfig) -> dict[str, WanTransformer]:
    """Each trained expert built on meta and filled (fp32) from the checkpoint at `cfg.init`."""
    from vidmoe.io.checkpoints import detect_layout, load_into

    layout = detect_layout(cfg.init)
    missing = [n for n in cfg.trained_experts if n not in layout.experts]
    if missing:
        raise ValueError(
            f"init {cfg.init} has experts {list(layout.experts)}, not {missing}: train experts "
            f"with the same names (moe.expert_names) as the init model"
        )
    experts = {}
    for name in cfg.trained_experts:
        want = cfg.transformer_for(name)
        check_same_architecture(want, layout.config.transformer_for(name), name, cfg.init)
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


def add_lora(expert: nn.Module, cfg: TrainConfig) -> None:
    """Inject a peft LoRA adapter into `expert` in place; only its A/B matrices stay trainable."""
    from peft import inject_adapter_in_model

    names = [n for n, _ in expert.named_modules()]
    unmatched = [
        t for t in cfg.lora_targets if not any(n == t or n.endswith("." + t) for n in names)
    ]
    if unmatched:
        linears = sorted({n.split(".", 2)[-1] for n, m in expert.named_modules()
                          if isinstance(m, nn.Linear) and n.startswith("blocks.0.")})  # fmt: skip
        raise ValueError(
            f"lora_targets {unmatched} match no module of the expert; block modules: {linears}"
        )
    inject_adapter_in_model(lora_config(cfg), expert, adapter_name=ADAPTER_NAME)
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
            "was it written with other lora_rank / lora_targets? use a new out_dir"
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


def _peft_metadata(cfg: TrainConfig, modules: list[str]) -> dict[str, Any]:
    """The LoraConfig fields diffusers and vidmoe read from `lora_adapter_metadata`."""
    return {"r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha or cfg.lora_rank,
            "target_modules": sorted(modules), "lora_dropout": cfg.lora_dropout, "bias": "none",
            "use_rslora": False, "use_dora": False, "lora_bias": False}  # fmt: skip


def save_lora_adapters(trainer: Trainer, *, use_ema: bool = False) -> Path:
    """Write each trained expert's adapter in peft's layout and all of them in diffusers' layout.

    Files: `<out_dir>/lora/<expert>/adapter_model.safetensors` + `adapter_config.json`, and
    `<out_dir>/lora/diffusers_lora.safetensors` (`lora_ema/` with `use_ema`); each is written
    atomically. Returns the folder.
    """
    from vidmoe.io.keymaps import transformer_to_diffusers
    from vidmoe.io.tensors import save_safetensors_atomic, write_text_atomic

    cfg = trainer.cfg
    names = cfg.moe.expert_names
    if len(names) > len(DIFFUSERS_PREFIXES):
        raise ValueError(f"the diffusers Wan layout holds at most 2 experts; this run has {names}")
    folder = trainer.out_dir / (LORA_EMA_DIR if use_ema else LORA_DIR)
    combined: dict[str, torch.Tensor] = {}
    targets: dict[str, list[str]] = {}  # diffusers prefix -> diffusers module names
    for name, expert in trainer.experts.items():
        pairs = adapter_tensors(expert, trainer.ema.shadow[name] if use_ema else None)
        tensors = {}
        for module, (a, b) in pairs.items():
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
        # vidmoe reads the alpha from this metadata; peft reads it from adapter_config.json
        peft_meta = json.dumps(_peft_metadata(cfg, list(pairs)))
        save_safetensors_atomic(tensors, folder / name / ADAPTER_FILE,
                                metadata={"format": "pt", "lora_adapter_metadata": peft_meta})  # fmt: skip
        write_text_atomic(_adapter_config_json(cfg), folder / name / ADAPTER_CONFIG_FILE)

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
    meta = {f"{prefix}{k}": v for prefix in DIFFUSERS_PREFIXES[: len(names)]
            for k, v in _peft_metadata(cfg, targets.get(prefix, trained)).items()}  # fmt: skip
    save_safetensors_atomic(combined, folder / DIFFUSERS_FILE,
                            metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})  # fmt: skip
    return folder


def _adapter_config_json(cfg: TrainConfig) -> str:
    d = lora_config(cfg).to_dict()
    d["base_model_name_or_path"] = cfg.init or None
    d["inference_mode"] = True
    return json.dumps({k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}, indent=2)


def on_checkpoint(trainer: Trainer) -> None:
    """After each checkpoint of a LoRA run: the adapter files (raw, and EMA when it is on)."""
    if trainer.cfg.lora_rank:
        save_lora_adapters(trainer)
        if trainer.cfg.ema_decay > 0:
            save_lora_adapters(trainer, use_ema=True)
