"""From a path or preset name to a ready `Pipeline`: layout detection, model building on the
meta device, weights streamed from memory-mapped files one expert at a time.

`load_pipeline(None)` loads the demo model shipped in the package.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vidmoe.config import PRESETS, ModelConfig, get_preset
from vidmoe.sampling.pipeline import Pipeline

DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def _default_model(model: str | Path | None) -> str | Path:
    if model is not None:
        return model
    if not (DEMO_DIR / "vidmoe.json").exists():
        raise FileNotFoundError(
            f"the demo model is not installed at {DEMO_DIR}; give a checkpoint with --model PATH "
            f"or a preset ({', '.join(PRESETS)})"
        )
    return DEMO_DIR


def model_config_for(model: str | Path | None) -> ModelConfig:
    """The ModelConfig of a checkpoint path or preset, read without loading any weights."""
    model = _default_model(model)
    if isinstance(model, str) and model in PRESETS:
        return get_preset(model)
    from vidmoe.io.checkpoints import detect_layout

    return detect_layout(Path(model)).config


def build_random_pipeline(config: ModelConfig | str, *, seed: int = 0, device="cpu",
                          dtype: torch.dtype = torch.float32) -> Pipeline:  # fmt: skip
    """A pipeline with randomly initialised weights (tests, benchmarks, `--model tiny-t2v`)."""
    from vidmoe.models.text_encoder import build_text_encoder
    from vidmoe.models.transformer import WanTransformer
    from vidmoe.models.vae import WanVAE

    config = get_preset(config) if isinstance(config, str) else config
    torch.manual_seed(seed)
    experts = {}
    for name in config.moe.expert_names:
        expert = WanTransformer(config.transformer_for(name))
        torch.nn.init.normal_(expert.head.head.weight, std=0.02)  # the release init zeroes it
        experts[name] = expert.to(dtype)
    vae = WanVAE(config.vae)
    text = build_text_encoder(
        config.text_encoder,
        None,
        device=device,
        dtype=torch.float32,
        max_length=config.transformer.text_len,
    )
    pipe = Pipeline(config, experts, vae, text, device=device, dtype=dtype)
    pipe.source = {"preset": config.name, "weights": f"random (seed {seed})"}
    return pipe


def load_pipeline(model: str | Path | None = None, *, device: str = "auto", dtype: str | torch.dtype = "auto",
                  residency: str = "resident", strict: bool = True) -> Pipeline:  # fmt: skip
    """Load a pipeline from a checkpoint (any supported layout), a preset name, or the demo model.

    A preset name builds that architecture with random weights (useful for tests and timing).
    """
    model = _default_model(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if isinstance(model, str) and model in PRESETS:
        return build_random_pipeline(model, device=dev, dtype=dt)
    from vidmoe.io.checkpoints import load_components

    # swap keeps idle experts in host RAM: load them there, the pipeline moves one at a time
    c = load_components(
        Path(model), device="cpu" if residency == "swap" else dev, dtype=dt, strict=strict
    )
    pipe = Pipeline(
        c.config, c.experts, c.vae, c.text_encoder, device=dev, dtype=dt, residency=residency
    )
    pipe.source = {"path": str(model), "layout": c.layout}
    return pipe


def describe_model(model: str | Path | None) -> str:
    """Experts, parameter counts (total, active per step: the largest expert), boundary and plan."""
    from vidmoe.sampling.pipeline import build_plan_for
    from vidmoe.sampling.settings import GenerateSettings, resolve_settings

    config = model_config_for(model)
    counts = expert_param_counts(config)
    k = len(config.moe.expert_names)
    t = config.transformer
    if len(set(counts.values())) == 1:
        each = f"{_fmt(max(counts.values()))} per expert"
    else:
        each = "per expert: " + ", ".join(f"{n} {_fmt(c)}" for n, c in counts.items())
    differs = [
        f"  {name} differs: " + ", ".join(f"{f} {v}" for f, v in changes)
        for name, changes in config.expert_overrides
    ]
    lines = [
        f"model: {config.name} ({t.model_type}; {k} expert{'s' if k > 1 else ''}; text encoder {config.text_encoder})",
        f"expert architecture: dim {t.dim}, {t.num_layers} layers, {t.num_heads} heads, ffn {t.ffn_dim}, "
        f"in {t.in_dim} / out {t.out_dim} channels, patch {t.patch_size}"
        + (f", window {t.window_size}" if t.window_size != (-1, -1) else ""),
        *differs,
        f"parameters: {_fmt(sum(counts.values()))} total, {_fmt(max(counts.values()))} active per step ({each})",
        f"experts: {', '.join(config.moe.expert_names)}; boundaries (sigma): "
        f"{', '.join(f'{b:g}' for b in config.moe.boundaries) or 'none'}",
        f"guidance: {', '.join(f'{n}={g:g}' for n, g in zip(config.moe.expert_names, config.moe.guidance))}",
        f"defaults: {config.default_size[0]}x{config.default_size[1]}, {config.default_num_frames} frames at "
        f"{config.fps} fps, {config.scheduler.sampler}, {config.scheduler.num_steps} steps, shift {config.scheduler.shift:g}",
        f"VAE: Wan{config.vae.generation} ({config.vae.z_dim} latent channels, stride "
        f"{config.vae.temporal_stride}x{config.vae.spatial_stride}x{config.vae.spatial_stride})",
        "",
    ]
    image = "<image>" if t.model_type == "i2v" else None
    plan = build_plan_for(resolve_settings(GenerateSettings(image=image), config), config)
    return "\n".join(lines) + plan.summary()


def expert_param_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters of each expert (built on the meta device: no memory), keyed by expert name."""
    from vidmoe.models.transformer import WanTransformer

    with torch.device("meta"):
        return {
            name: WanTransformer(config.transformer_for(name)).num_params()
            for name in config.moe.expert_names
        }


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit} ({n:,})"
    return str(n)
