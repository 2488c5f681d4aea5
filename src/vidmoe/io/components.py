"""Components from separate files: experts, a VAE and a text encoder, each in any layout vidmoe
reads, on top of (or instead of) a model folder.

`open_expert_file` reads one expert file or folder (official, diffusers, ComfyUI/Kijai single
files in bf16, fp16, fp8 or fp8_scaled, GGUF) under release names with the architecture it implies;
`open_vae_file` does the same for a VAE; `load_text_encoder_file` builds umT5 from a release
`.pth`, a diffusers folder or a ComfyUI file (fp16 or fp8_scaled). `load_components_from` puts
them together, strictly: a file that does not fit its model is an error naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from vidmoe.config import ModelConfig, TransformerConfig, VAEConfig
from vidmoe.io import keymaps
from vidmoe.io.layouts import (
    Layout,
    detect_layout,
    implied_config,
    transformer_config_from_shapes,
    vae_config_from_shapes,
)
from vidmoe.io.tensors import FP8Source, RenamedSource, TensorSource, open_tensors

EXPERT_FILES = (
    "an official or diffusers expert folder (config.json + safetensors), a .safetensors "
    "file with release, diffusers or ComfyUI ('model.diffusion_model.') names, or a .gguf file"
)
# Fields a file's shapes determine; the rest (text_len, eps, window) come from the model's config.
SHAPE_FIELDS = (
    "model_type",
    "patch_size",
    "in_dim",
    "dim",
    "ffn_dim",
    "freq_dim",
    "text_dim",
    "out_dim",
    "num_layers",
    "qk_norm",
    "cross_attn_norm",
    "pooled_text",
)


@dataclass(frozen=True, kw_only=True)
class ComponentFile:
    """One component read from its own file: tensors under release names, and what it implies."""

    path: Path
    """The file or folder given."""
    tensors: TensorSource
    """Lazy tensors under release names (fp8 scales still beside their weights)."""
    naming: str
    """How the file names its tensors: 'release', 'comfyui', 'diffusers' or 'gguf'."""
    config: TransformerConfig | VAEConfig | None
    """The architecture the file implies (read from its config.json or its shapes); None when
    the shapes do not determine it (see `config_error`): a model folder must then give it."""
    config_error: str = ""
    """Why `config` is None."""
    notes: tuple[str, ...] = ()
    """What was inferred rather than read."""


def _renamed(source: TensorSource, path: Path) -> tuple[TensorSource, str]:
    """`source` under release transformer names, and the naming it had."""
    names = list(source)
    if any(n.startswith(keymaps.COMFYUI_PREFIXES) for n in names):
        return RenamedSource(source, keymaps.strip_comfyui_prefix), "comfyui"
    if "head.modulation" in source:
        return source, "release"
    if "scale_shift_table" in source and "proj_out.weight" in source:
        return RenamedSource(source, keymaps.transformer_to_release), "diffusers"
    raise ValueError(
        f"{path} holds no Wan expert: neither release names ('head.modulation'), diffusers names "
        f"('scale_shift_table', 'proj_out.weight') nor ComfyUI ones; first names: {names[:5]}. "
        f"Accepted: {EXPERT_FILES}"
    )


def open_expert_file(path: str | Path) -> ComponentFile:
    """One expert transformer from its own file or folder (see `EXPERT_FILES`)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"expert file {path} does not exist")
    if path.is_dir():
        config_json = path / "config.json"
        if not config_json.is_file():
            raise ValueError(f"expert folder {path} has no config.json. Accepted: {EXPERT_FILES}")
        d = json.loads(config_json.read_text())
        source = open_tensors(path)
        if "num_attention_heads" in d:
            cfg = keymaps.transformer_config_from_diffusers(d)
            return ComponentFile(
                path=path,
                naming="diffusers",
                config=cfg,
                tensors=RenamedSource(source, keymaps.transformer_to_release),
            )
        cfg = keymaps.transformer_config_from_release(d)
        return ComponentFile(path=path, naming="release", config=cfg, tensors=source)
    if path.suffix == ".gguf":
        from vidmoe.io.gguf import GGUFSource

        source, naming = _renamed(GGUFSource(path), path)
        naming = "gguf"
    elif path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json"):
        source, naming = _renamed(open_tensors(path), path)
    else:
        raise ValueError(f"unknown expert file type {path.name!r}. Accepted: {EXPERT_FILES}")
    try:
        cfg, notes = transformer_config_from_shapes(source)
    except ValueError as e:
        return ComponentFile(
            path=path, tensors=source, naming=naming, config=None, config_error=f"{path}: {e}"
        )
    return ComponentFile(path=path, tensors=source, naming=naming, config=cfg, notes=notes)


def open_vae_file(path: str | Path) -> ComponentFile:
    """A VAE from its own file: a release `.pth`, a `.safetensors` with release names (as ComfyUI
    ships `wan_2.1_vae.safetensors`), or a diffusers `vae/` folder."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        cfg = keymaps.vae_config_from_diffusers(json.loads((path / "config.json").read_text()))
        renamed = RenamedSource(open_tensors(path), keymaps.vae_renamer(cfg, to_diffusers=False))
        return ComponentFile(path=path, tensors=renamed, naming="diffusers", config=cfg)
    source = open_tensors(path)
    if "encoder.conv1.weight" not in source:
        raise ValueError(
            f"{path} is not a Wan VAE under release names (no 'encoder.conv1.weight'; first names "
            f"{list(source)[:5]}); give a release .pth, a ComfyUI VAE .safetensors or a diffusers "
            "vae/ folder (config.json + weights)"
        )
    cfg, notes = vae_config_from_shapes(source)
    return ComponentFile(path=path, tensors=source, naming="release", config=cfg, notes=notes)


def _differing(a: TransformerConfig, b: TransformerConfig) -> list[str]:
    return [
        f"{f} {getattr(a, f)} vs {getattr(b, f)}"
        for f in SHAPE_FIELDS
        if getattr(a, f) != getattr(b, f)
    ]


def _check_experts(files: Mapping[str, ComponentFile]) -> TransformerConfig:
    """The experts' shared architecture; experts whose shapes disagree are an error."""
    for f in files.values():
        if f.config is None:
            raise ValueError(f"{f.config_error}; give a model folder (--model) whose config fits")
    (first_name, first), *rest = files.items()
    for name, f in rest:
        diff = _differing(first.config, f.config)
        if diff:
            raise ValueError(
                f"expert {name} ({f.path}) disagrees with expert {first_name} ({first.path}) in "
                f"{'; '.join(diff)}: give both experts of one model"
            )
    return first.config


def _base(model: str | Path | None) -> tuple[ModelConfig | None, Layout | None]:
    from vidmoe.presets import PRESETS

    if model is None:
        return None, None
    if isinstance(model, str) and model in PRESETS:
        return PRESETS[model], None
    return (layout := detect_layout(model)).config, layout


def assemble_config(
    model: str | Path | None, experts: Mapping[str, ComponentFile], vae: ComponentFile | None
) -> tuple[ModelConfig, tuple[str, ...]]:
    """The model config of a folder or preset with files on top, or of the files alone."""
    config, _ = _base(model)
    if config is not None:
        for name, f in experts.items():
            if name not in config.moe.expert_names:
                raise ValueError(
                    f"--expert {name}={f.path}: {model} has experts {list(config.moe.expert_names)}"
                )
            diff = _differing(config.transformer_for(name), f.config) if f.config else []
            if diff:
                raise ValueError(
                    f"expert file {f.path} does not fit {name} of {model}: "
                    f"model vs file: {'; '.join(diff)}"
                )
        return config, ()
    names = list(experts)
    if not names:
        raise ValueError(
            "without --model, give the experts: --expert high_noise=FILE --expert low_noise=FILE"
        )
    if vae is None:
        raise ValueError(
            f"expert files without a model folder need the VAE: give --vae FILE "
            f"(e.g. Wan2.1_VAE.pth or wan_2.1_vae.safetensors) for {names}"
        )
    transformer = _check_experts(experts)
    notes = tuple(n for f in experts.values() for n in f.notes) + vae.notes
    stem = Path(experts[names[0]].path).stem
    config, more = implied_config(stem, transformer, vae.config, names)
    return config, notes + more


def load_text_encoder_file(
    path: str | Path,
    *,
    tokenizer: str | Path | None = None,
    device="cpu",
    dtype=torch.bfloat16,
    max_length: int = 512,
):
    """umT5 from its own file: the release `.pth`, a diffusers `text_encoder/` folder, or a ComfyUI
    `umt5_xxl_fp16.safetensors` / `umt5_xxl_fp8_e4m3fn_scaled.safetensors` (scales applied).

    The tokenizer is `tokenizer`, else `google/umt5-xxl/` or `tokenizer/` beside the file.
    """
    from vidmoe.models.text_encoder import HFTextEncoder, HFTokenizer
    from vidmoe.models.umt5 import (
        clean_prompt,
        load_umt5_state_dict,
        umt5_config_from_state_dict,
        umt5_hf_names,
    )

    path = Path(path)
    source = FP8Source(open_tensors(path))
    try:
        names = umt5_hf_names(list(source))  # HF name -> file name
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    sd = {hf: source[n].to(dtype) for hf, n in names.items()}
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(umt5_config_from_state_dict(sd))
    try:
        load_umt5_state_dict(model, sd)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    folder = path if path.is_dir() else path.parent
    candidates = (
        [Path(tokenizer)]
        if tokenizer
        else [folder / "google" / "umt5-xxl", folder / "tokenizer", folder.parent / "tokenizer"]
    )
    found = next((c for c in candidates if c.is_dir()), None)
    if found is None:
        raise ValueError(
            f"no umT5 tokenizer for {path}: looked in {[str(c) for c in candidates]}; "
            "put the google/umt5-xxl tokenizer folder beside the file"
        )
    return HFTextEncoder(model, HFTokenizer(found, max_length, clean_prompt))


def load_components_from(
    model: str | Path | None,
    *,
    experts: Mapping[str, str | Path] | None = None,
    vae: str | Path | None = None,
    text_encoder: str | Path | None = None,
    device="cpu",
    dtype: torch.dtype = torch.bfloat16,
    strict: bool = True,
    quantize: str | None = None,
):
    """A model folder or preset (or nothing) with components from separate files on top.

    Args:
        model: a checkpoint folder, a preset name (its architecture: every weight must come from
            a file), or None (the experts and the VAE files define the model).
        experts: expert name -> file or folder (see `open_expert_file`).
        vae, text_encoder: a VAE file (`open_vae_file`), a umT5 file (`load_text_encoder_file`).
    Returns:
        `LoadedComponents`, its `layout` 'files' or '<kind>+files'.
    """
    from vidmoe.io.checkpoints import (
        LoadedComponents,
        build_expert,
        load_expert,
        load_into,
        load_vae,
    )
    from vidmoe.models.text_encoder import build_text_encoder
    from vidmoe.models.vae import WanVAE

    files = {n: open_expert_file(p) for n, p in (experts or {}).items()}
    vae_file = open_vae_file(vae) if vae is not None else None
    config, notes = assemble_config(model, files, vae_file)
    _, layout = _base(model)
    modules = {}
    for name in config.moe.expert_names:
        if name in files:
            f = files[name]
            modules[name] = build_expert(
                config.transformer_for(name),
                f.tensors,
                device=device,
                dtype=dtype,
                strict=strict,
                quantize=quantize,
                what=f"expert file {f.path}",
            )
        elif layout is not None:
            modules[name] = load_expert(
                layout, name, device=device, dtype=dtype, strict=strict, quantize=quantize
            )
        else:
            raise ValueError(
                f"{model} gives no weights for expert {name}: add --expert {name}=FILE"
            )
    if vae_file is not None:
        with torch.device("meta"):
            vae_module = WanVAE(config.vae)
        try:
            load_into(vae_module, vae_file.tensors, strict=strict, device=device)
        except ValueError as e:
            raise ValueError(f"VAE file {vae_file.path}: {e}") from None
        vae_module = vae_module.eval().requires_grad_(False)
    elif layout is not None and layout.vae is not None:
        vae_module = load_vae(layout, device=device, strict=strict)
    else:
        raise ValueError(f"{model or 'the expert files'} holds no VAE weights: give --vae FILE")
    text_len = config.transformer.text_len
    if text_encoder is not None:
        text = load_text_encoder_file(
            text_encoder,
            device=device,
            max_length=text_len,
            tokenizer=layout.tokenizer if layout else None,
        )
    elif layout is not None or config.text_encoder != "umt5-xxl":
        kind = config.text_encoder
        where = (layout.root if kind == "umt5-xxl" else layout.text_encoder) if layout else None
        text = build_text_encoder(kind, where, device=device, max_length=text_len)
    else:
        raise ValueError(
            "the expert files need umT5: give --text-encoder FILE "
            "(models_t5_umt5-xxl-enc-bf16.pth or umt5_xxl_fp16.safetensors)"
        )
    kind = f"{layout.kind}+files" if layout else "files"
    return LoadedComponents(
        config=config,
        experts=modules,
        vae=vae_module,
        text_encoder=text,
        layout=kind,
        notes=notes + (layout.notes if layout else ()),
    )
