"""Training checkpoints and EMA: atomic files that hold everything a killed run needs to resume
bit-exactly (weights, EMA, optimiser, scheduler, every RNG state, data position), and the export
of EMA experts into vidmoe's model folder layout (`experts/<name>.safetensors`).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """torch.save `state` to a temp file beside `path`, fsync it, then rename it onto `path`.

    A crash at any moment leaves either the previous checkpoint or the new one, never a torn file.
    """
    from vidmoe.io.atomic import atomic_write

    return atomic_write(path, lambda tmp: torch.save(dict(state), tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` (on the CPU).

    Unpickles with `weights_only=True` (tensors, containers and numbers only; nothing in the file
    can run code); the numpy array reconstruction that checkpoints written before the numpy RNG
    state was stored as a tensor need is the one other thing allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}")
    if hasattr(torch.serialization, "safe_globals"):
        allowed = torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS)
    else:  # torch 2.4: only the process-wide list
        torch.serialization.add_safe_globals(_NUMPY_ARRAY_GLOBALS)
        allowed = contextlib.nullcontext()
    try:
        with allowed:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn file or a foreign pickle: say which file and why
        raise ValueError(f"{path} is not a readable training checkpoint: {e}") from None


_NUMPY_ARRAY_GLOBALS = [
    np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """The states of python's, numpy's and torch's global RNGs, and of `generator` (all of them
    tensors, tuples and numbers, so `load_checkpoint` reads them with `weights_only=True`)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: Mapping[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if generator is not None:
        generator.set_state(state["generator"])


class EMA:
    """Exponential moving averages of the trainable parameters of named modules (fp32 copies)."""

    def __init__(self, modules: Mapping[str, nn.Module], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1); got {decay}")
        self.decay = decay
        self.shadow = {
            name: {
                k: p.detach().float().clone() for k, p in m.named_parameters() if p.requires_grad
            }
            for name, m in modules.items()
        }

    def decay_at(self, step: int) -> float:
        """Warm-up of the decay, (1 + step) / (10 + step), so early averages are not stale."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, modules: Mapping[str, nn.Module], step: int) -> None:
        d = self.decay_at(step)
        for name, m in modules.items():
            shadow = self.shadow[name]
            for k, p in m.named_parameters():
                if k in shadow:  # frozen parameters (LoRA's base weights) are not averaged
                    shadow[k].lerp_(p.detach().float(), 1.0 - d)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(
        self, state: Mapping[str, Any], device: torch.device | str | None = None
    ) -> None:
        """Take the averages of `state` (onto `device`, the experts' device, when given)."""
        self.decay = state["decay"]
        self.shadow = {
            n: {k: v.to(device, copy=True) for k, v in s.items()}
            for n, s in state["shadow"].items()
        }

    def expert_state(self, name: str, like: nn.Module) -> dict[str, torch.Tensor]:
        """A full state_dict of expert `name` with EMA parameters (buffers taken from `like`)."""
        state = {k: v.detach().clone() for k, v in like.state_dict().items()}
        state.update({k: v.clone() for k, v in self.shadow[name].items()})
        return state


def export_experts(
    states: Mapping[str, Mapping[str, torch.Tensor]],
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
) -> list[Path]:
    """Write each expert's state_dict as `out_dir/experts/<name>.safetensors` in `dtype`.

    Floating tensors are cast to `dtype`; files are written atomically.
    """
    from vidmoe.io.atomic import save_safetensors_atomic

    paths = []
    for name, state in states.items():
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
        path = Path(out_dir) / "experts" / f"{name}.safetensors"
        paths.append(save_safetensors_atomic(tensors, path, metadata={"expert": name}))
    return paths


def export_model(
    checkpoint_path: str | Path | Sequence[str | Path],
    config,
    vae_state: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    use_ema: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    experts_from: str | Path | None = None,
) -> Path:
    """Write a trained run as a vidmoe model folder that `vidmoe.loading.load_pipeline` reads.

    Args:
        checkpoint_path: a training checkpoint (`checkpoint.pt`), or several whose experts
            together make the model (runs that each trained a subset, `TrainConfig.experts`).
        config: the `ModelConfig` to write as `vidmoe.json`; its experts and each expert's
            architecture (`transformer_for`, overrides included) must match the runs'.
        vae_state: the VAE's state_dict, written as float32 `vae.safetensors`.
        out_dir: the model folder: vidmoe.json, experts/<name>.safetensors, vae.safetensors.
        use_ema: export the EMA weights (else the raw weights).
        dtype: dtype of the expert files.
        experts_from: a model folder whose `experts/<name>.safetensors` give the experts no run
            trained (a run that fine-tuned one expert of that model); checked name by name and
            shape by shape against `config`.
    Returns:
        out_dir.
    """
    from vidmoe.io.atomic import save_safetensors_atomic, write_text_atomic

    paths = [checkpoint_path] if isinstance(checkpoint_path, (str, Path)) else checkpoint_path
    names = list(config.moe.expert_names)
    experts: dict[str, dict[str, torch.Tensor]] = {}
    trained: dict[str, tuple[Path, dict[str, Any]]] = {}  # expert -> (checkpoint, run config)
    for path in paths:
        state = load_checkpoint(path)
        run = state.get("config") or {}
        if (run.get("lora") or {}).get("rank") or run.get("lora_rank"):  # [lora]; before: top level
            raise ValueError(
                f"{path} is a LoRA run, which holds adapters only: load {Path(path).parent}/lora/ "
                "with Pipeline.load_lora on its init model (TrainConfig.init)"
            )
        for name, weights in state["experts"].items():
            if name in experts:
                raise ValueError(f"expert {name!r} is in more than one checkpoint ({path})")
            weights = dict(weights)
            if use_ema:
                weights.update(state["ema"]["shadow"][name])
            experts[name] = weights
            trained[name] = (Path(path), state.get("config"))
    if experts_from is not None:
        for name in names:
            if name not in experts:
                experts[name] = _model_expert(Path(experts_from), name, config)
    if sorted(names) != sorted(experts):
        hint = "" if experts_from else " (--experts-from MODEL takes the others from a model)"
        raise ValueError(
            f"the config's experts {names} differ from the checkpoints' {sorted(experts)}{hint}"
        )
    for name, (path, run_config) in trained.items():
        if run_config is not None:
            _check_architecture(config, name, run_config, path)
    out_dir = Path(out_dir)
    export_experts(experts, out_dir, dtype=dtype)
    save_safetensors_atomic(
        {k: v.float() for k, v in vae_state.items()}, out_dir / "vae.safetensors"
    )
    write_text_atomic(config.to_json() + "\n", out_dir / "vidmoe.json")
    return out_dir


def _model_expert(model: Path, name: str, config) -> dict[str, torch.Tensor]:
    """Expert `name`'s weights from the model folder `model`, checked against `config`'s
    architecture for it (names and shapes) before they are read."""
    from vidmoe.io.checkpoints import check_names_and_shapes
    from vidmoe.io.tensors import open_tensors
    from vidmoe.models.transformer import WanTransformer

    path = model / "experts" / f"{name}.safetensors"
    if not path.is_file():
        raise ValueError(f"{model} has no expert {name!r} ({path} does not exist)")
    source = open_tensors(path)
    with torch.device("meta"):
        like = WanTransformer(config.transformer_for(name))
    check_names_and_shapes(like.state_dict(), source, strict=True, into=f"expert {name!r}")
    return {k: source[k] for k in source}


def _check_architecture(config, name: str, run_config: Mapping[str, Any], path: Path) -> None:
    """Raise if expert `name` of the run (its saved TrainConfig dict) differs from `config`'s."""
    import dataclasses

    from vidmoe.config import TransformerConfig, expert_transformer, normalize_expert_overrides

    shared = TransformerConfig.from_dict(run_config["transformer"])
    run_names = tuple(run_config["moe"]["expert_names"])
    run_overrides = run_config.get("expert_overrides", {})
    overrides = normalize_expert_overrides(run_overrides, shared, run_names)
    ran = expert_transformer(shared, overrides, run_names, name)
    wanted = config.transformer_for(name)
    if ran == wanted:
        return
    fields = [
        f.name for f in dataclasses.fields(ran) if getattr(ran, f.name) != getattr(wanted, f.name)
    ]
    detail = ", ".join(f"{f} {getattr(ran, f)} (config: {getattr(wanted, f)})" for f in fields)
    raise ValueError(
        f"expert {name!r} in {path} was trained with {detail}: export with a ModelConfig whose "
        f"transformer and expert_overrides match the run's (its expert_overrides: "
        f"{dict(run_overrides) or 'none'})"
    )
