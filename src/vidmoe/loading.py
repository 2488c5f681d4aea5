"""From a path or preset name to a ready `Pipeline`: layout detection, model building on the
meta device, weights streamed from memory-mapped files one expert at a time, gathered into one
`Experts` with their placement (device, dtype, residency).

`load_pipeline(None)` loads the demo model shipped in the package.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vidmoe.config import ModelConfig
from vidmoe.devices import DTYPES, resolve_device, resolve_dtype  # noqa: F401 (re-exported)
from vidmoe.models.attention import resolve_backend
from vidmoe.models.moe import Experts, ParamCounts, Placement, count_params
from vidmoe.presets import PRESETS, get_preset
from vidmoe.sampling.pipeline import Pipeline
from vidmoe.sampling.rewrite import find_lexicon

DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"


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


def build_random_pipeline(
    config: ModelConfig | str,
    *,
    seed: int = 0,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    residency: str = "resident",
    text_encoder_device: str | torch.device | None = None,
) -> Pipeline:
    """A pipeline with randomly initialised weights (tests, benchmarks, `--model tiny-t2v`).

    Residency 'disk' is refused: these experts have no file to be re-read from.
    """
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
    placement = Placement(
        device=device, dtype=dtype, residency=residency, text_encoder_device=text_encoder_device
    )
    _place_text_encoder(text, placement)
    pipe = Pipeline(config, Experts(experts, config.moe, placement=placement), vae, text)
    pipe.source = {"preset": config.name, "weights": f"random (seed {seed})"}
    return pipe


def load_pipeline(
    model: str | Path | None = None,
    *,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    residency: str = "resident",
    strict: bool = True,
    quantize: str | None = None,
    experts: dict[str, str | Path] | None = None,
    vae: str | Path | None = None,
    text_encoder: str | Path | None = None,
    attention: str = "auto",
    compile: bool = False,
    text_encoder_device: str | None = None,
    shard=None,
) -> Pipeline:
    """Load a pipeline from a checkpoint (any supported layout), a preset name, or the demo model.

    A preset name builds that architecture with random weights (useful for tests and timing).
    `residency` is a key of `RESIDENCY` (see docs/memory.md); `text_encoder_device` runs the text
    encoder elsewhere than the experts (e.g. 'cpu'; default: the compute device).
    `quantize="fp8"` keeps the experts' block linear layers in fp8 (e4m3, a float32 scale per
    output channel: `models.fp8`), from fp8 files as they are and from others as they load.
    `experts` ({name: file}), `vae` and `text_encoder` load those components from their own files
    (any layout, see docs/checkpoints.md) on top of `model`, or without one (`model=None`).
    `attention` picks the attention backend of every expert ('auto', 'sdpa', 'flash', 'sage':
    models/attention.py); `compile` compiles each transformer block (regional torch.compile).
    `shard` (a `vidmoe.parallel.fsdp.Sharding`, under torchrun) shards every expert (and the text
    encoder) over the ranks with FSDP2; a checkpoint folder is then read shard by shard.
    Every path records what it loaded in `pipe.source` with the same keys (`_finish`).
    """
    if quantize not in (None, "fp8"):
        raise ValueError(
            f"quantize must be fp8 or None (the weights' own format); got {quantize!r}"
        )
    dev = resolve_device(device)
    te_dev = None if text_encoder_device is None else resolve_device(text_encoder_device)
    placement = Placement(
        device=dev, dtype=resolve_dtype(dtype, dev), residency=residency, text_encoder_device=te_dev
    )
    resolve_backend(attention, device=dev, dtype=placement.dtype)  # refuse before reading weights
    if shard is not None:
        from vidmoe.parallel.fsdp import check_shardable, load_sharded_pipeline

        check_shardable(residency=residency, quantize=quantize, compile=compile)
        files = (
            dict(experts=experts, vae=vae, text_encoder=text_encoder)
            if experts or vae is not None or text_encoder is not None
            else None
        )
        pipe = load_sharded_pipeline(model, placement, shard, strict=strict, files=files)
        return _finish(
            pipe,
            files=_files_read(
                model if files else _default_model(model), experts, vae, text_encoder
            ),
            quantize=None,
            attention=attention,
            compile=False,
        )
    if experts or vae is not None or text_encoder is not None:
        pipe, files = _files_pipeline(
            model,
            placement,
            strict=strict,
            experts=experts,
            vae=vae,
            text_encoder=text_encoder,
            quantize=quantize,
        )
    else:
        model = _default_model(model)
        if isinstance(model, str) and model in PRESETS:
            pipe, files = _preset_pipeline(model, placement, quantize=quantize), {}
        elif residency == "disk":
            pipe, files = _disk_pipeline(Path(model), placement, strict=strict, quantize=quantize)
        else:
            pipe, files = _folder_pipeline(Path(model), placement, strict=strict, quantize=quantize)
    return _finish(pipe, files=files, quantize=quantize, attention=attention, compile=compile)


def _finish(
    pipe: Pipeline, *, files: dict[str, str], quantize: str | None, attention: str, compile: bool
) -> Pipeline:
    """The one tail of every load path: the text encoder placed, attention set, blocks compiled,
    and what was loaded recorded in `pipe.source` (the run's JSON), with the same keys whatever
    the path: its own (`path`/`layout`, or `preset`/`weights`), then `files` (component ->
    file read), `residency`, `device`, `dtype`, `text_encoder_device`, `quantize`, `attention`
    (expert -> backend) and `compile`; a model folder's `lexicon.json` becomes the pipeline's
    prompt rewriter (`lexicon`: its path, or None)."""
    placement = pipe.experts.placement
    _place_text_encoder(pipe.text_encoder, placement)
    te_dev = placement.text_encoder_device
    pipe.source.update(
        files=files,
        residency=placement.residency,
        device=str(placement.device),
        dtype=str(placement.dtype).removeprefix("torch."),
        text_encoder_device=None if te_dev is None else str(te_dev),
        quantize=quantize,
    )
    pipe.lexicon = find_lexicon(pipe.source.get("path"))
    pipe.source["lexicon"] = None if pipe.lexicon is None else pipe.lexicon.source
    return speed_up(pipe, attention=attention, compile=compile)


def speed_up(pipe: Pipeline, *, attention: str = "auto", compile: bool = False) -> Pipeline:
    """Set every expert's attention backend and, with `compile`, compile its blocks; once, at
    load. Recorded in `pipe.source`: `attention` (expert -> backend), `compile` ('blocks' or
    None)."""
    chosen = {
        n: e.set_attention(attention, device=pipe.experts.device) for n, e in pipe.experts.items()
    }
    if compile:
        for expert in pipe.experts.values():
            expert.compile_blocks()
    pipe.source.update(attention=chosen, compile="blocks" if compile else None)
    return pipe


def _preset_pipeline(name: str, placement: Placement, *, quantize: str | None) -> Pipeline:
    """A preset's architecture with random weights (`build_random_pipeline`), fp8 if asked."""
    pipe = build_random_pipeline(
        name,
        device=placement.device,
        dtype=placement.dtype,
        residency=placement.residency,
        text_encoder_device=placement.text_encoder_device,
    )
    if quantize == "fp8":
        from vidmoe.models.fp8 import quantize_fp8_

        for expert in pipe.experts.values():
            quantize_fp8_(expert)
    return pipe


def _folder_pipeline(
    path: Path, placement: Placement, *, strict: bool, quantize: str | None
) -> tuple[Pipeline, dict[str, str]]:
    """Every component from one checkpoint folder (or file) of any layout."""
    from vidmoe.io.checkpoints import detect_layout, load_components

    # residency: the other policies keep idle experts in host RAM: load them there
    resident = placement.residency == "resident"
    c = load_components(
        path,
        device=placement.device if resident else "cpu",
        dtype=placement.dtype,
        strict=strict,
        quantize=quantize,
    )
    experts = Experts(c.experts, c.config.moe, placement=placement)
    pipe = Pipeline(c.config, experts, c.vae, c.text_encoder)
    pipe.source = {"path": str(path), "layout": c.layout}
    return pipe, detect_layout(path).files()


def _files_pipeline(
    model: str | Path | None,
    placement: Placement,
    *,
    strict: bool,
    experts: dict[str, str | Path] | None,
    vae: str | Path | None,
    text_encoder: str | Path | None,
    quantize: str | None,
) -> tuple[Pipeline, dict[str, str]]:
    """Components from separate files (`vidmoe.io.components`) on top of a folder, a preset
    or nothing; `files` names each component's file, the folder's for those not given."""
    from vidmoe.io.components import load_components_from

    resident = placement.residency == "resident"
    c = load_components_from(
        model,
        experts=experts,
        vae=vae,
        text_encoder=text_encoder,
        strict=strict,
        device=placement.device if resident else "cpu",
        dtype=placement.dtype,
        quantize=quantize,
    )
    pipe = Pipeline(
        c.config, Experts(c.experts, c.config.moe, placement=placement), c.vae, c.text_encoder
    )
    pipe.source = {"path": str(model) if model is not None else None, "layout": c.layout}
    return pipe, _files_read(model, experts, vae, text_encoder)


def _files_read(model, experts, vae, text_encoder) -> dict[str, str]:
    """Component -> the file it is read from: the folder's, then those given on top."""
    from vidmoe.io.layouts import detect_layout

    folder = model is not None and not (isinstance(model, str) and model in PRESETS)
    files = detect_layout(model).files() if folder else {}
    files.update({f"expert.{n}": str(p) for n, p in (experts or {}).items()})
    files.update({"vae": str(vae)} if vae is not None else {})
    files.update({"text_encoder": str(text_encoder)} if text_encoder is not None else {})
    return files


def model_config_for_files(
    model: str | Path | None,
    *,
    experts: dict[str, str | Path] | None = None,
    vae: str | Path | None = None,
) -> ModelConfig:
    """The ModelConfig of a folder or preset with expert and VAE files on top (or of the files
    alone), read from headers and shapes without loading any weights."""
    from vidmoe.io.components import assemble_config, open_expert_file, open_vae_file

    files = {n: open_expert_file(p) for n, p in (experts or {}).items()}
    return assemble_config(model, files, open_vae_file(vae) if vae is not None else None)[0]


def _disk_pipeline(
    path: Path, placement: Placement, *, strict: bool, quantize: str | None = None
) -> tuple[Pipeline, dict[str, str]]:
    """Residency 'disk': each expert read (checked strictly) and released in turn, so host RAM
    never holds two; the experts' sources read them again when their phases come."""
    from vidmoe.io.checkpoints import detect_layout, load_expert, load_vae
    from vidmoe.models.moe import hollow
    from vidmoe.models.text_encoder import build_text_encoder

    layout = detect_layout(path)
    if layout.vae is None:
        raise ValueError(
            f"{path} is a {layout.kind} file with one expert and no VAE or text encoder; use a "
            "full checkpoint folder"
        )
    dev, dtype = placement.device, placement.dtype

    def source(name: str):
        return lambda: load_expert(
            layout, name, device=dev, dtype=dtype, strict=strict, quantize=quantize
        )

    experts = {}
    for name in layout.experts:
        experts[name] = load_expert(
            layout, name, device="cpu", dtype=dtype, strict=strict, quantize=quantize
        )
        hollow(experts[name])
    vae = load_vae(layout, device="cpu", dtype=torch.float32, strict=strict)
    kind = layout.config.text_encoder
    text_path = layout.root if kind == "umt5-xxl" else layout.text_encoder
    text = build_text_encoder(
        kind,
        text_path,
        device=placement.text_encoder_device or "cpu",
        max_length=layout.config.transformer.text_len,
    )
    sources = {name: source(name) for name in experts}
    pipe = Pipeline(
        layout.config,
        Experts(experts, layout.config.moe, placement=placement, sources=sources),
        vae,
        text,
    )
    pipe.source = {"path": str(path), "layout": layout.kind}
    return pipe, layout.files()


def _place_text_encoder(text, placement: Placement) -> None:
    """Move the text encoder's network to `placement.text_encoder_device`, when one is set."""
    network = getattr(text, "model", None)
    if placement.text_encoder_device is not None and network is not None:
        network.to(placement.text_encoder_device)


def describe_model(model: str | Path | None) -> str:
    """Experts, parameter counts (total, active per step: the largest expert), boundary and plan."""
    from vidmoe.sampling.plan import plan_for
    from vidmoe.sampling.settings import GenerateSettings, resolve_settings

    config = model_config_for(model)
    total = param_counts(config)
    counts = total.per_expert
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
        f"parameters: {_fmt(total.total)} total, {_fmt(total.active)} active per step ({each})",
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
    plan = plan_for(resolve_settings(GenerateSettings(image=image), config), config)
    return "\n".join(lines) + plan.summary()


def param_counts(config: ModelConfig) -> ParamCounts:
    """Parameter counts of a model's experts, built on the meta device (no memory)."""
    from vidmoe.models.transformer import WanTransformer

    with torch.device("meta"):
        experts = {n: WanTransformer(config.transformer_for(n)) for n in config.moe.expert_names}
    return count_params(experts)


def expert_param_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters of each expert, keyed by expert name (see `param_counts`)."""
    return param_counts(config).per_expert


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit} ({n:,})"
    return str(n)
