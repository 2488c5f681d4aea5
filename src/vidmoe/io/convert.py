"""`vidmoe convert`: any layout vidmoe reads into any layout it writes: the experts (optionally
fp8_scaled, or GGUF-quantised), the VAE, and the umT5 text encoder with its tokenizer.

The source is read lazily under release names (fp8 files dequantised through `FP8Source`, GGUF
files through `GGUFSource`; umT5 under HF names) and written one file at a time by
`vidmoe.io.writers` and `vidmoe.io.gguf`, each file atomically. Nothing is written as a pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vidmoe.config import ModelConfig
from vidmoe.io.tensors import FP8Source, RenamedSource, TensorSource

CONVERT_LAYOUTS = ("official", "diffusers", "comfyui", "vidmoe", "gguf")
SINGLE_FILE_LAYOUTS = {"comfyui": ".safetensors", "gguf": ".gguf"}
"""Layouts of one file per expert (no config): DST may be that file for a one-expert source."""
_TIED = "encoder.embed_tokens.weight"  # umT5's token embedding, tied to shared.weight


@dataclass(frozen=True, kw_only=True)
class Converted:
    """What `convert` wrote."""

    path: Path
    """DST: the folder, or the file of a one-expert source."""
    files: dict[str, str]
    """Component (`expert.<name>`, `vae`, `text_encoder`, `tokenizer`) -> file or folder."""
    notes: tuple[str, ...] = ()
    """What the source lacked and so was not written."""


class _AliasSource(RenamedSource):
    """A view of another source under new names (new -> old; an old name may stand for several
    new ones, as a shared position table); nothing is read until asked."""

    def __init__(self, source: TensorSource, names: dict[str, str]) -> None:
        self.source, self._old = source, names


@dataclass(frozen=True, kw_only=True)
class _Source:
    config: ModelConfig | None
    experts: dict[str, TensorSource]
    vae: TensorSource | None = None
    text_encoder: TensorSource | None = None
    """umT5 under HF names, the tied embedding once."""
    tokenizer: Path | None = None
    notes: tuple[str, ...] = ()


def _umt5_source(weights: Path) -> TensorSource:
    """A umT5 file or folder (release, HF, ComfyUI names; fp8_scaled dequantised) under HF names."""
    from vidmoe.io.tensors import open_tensors
    from vidmoe.models.umt5 import umt5_hf_names

    source = FP8Source(open_tensors(weights))
    try:
        names = umt5_hf_names(list(source))  # HF name -> the file's name
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    # one copy of the tied embedding, as `shared.weight` (ComfyUI's name); loaders re-tie it
    tied = names.pop(_TIED, None)
    if tied is not None:
        names.setdefault("shared.weight", tied)
    return _AliasSource(source, names)


def _read_source(src: Path) -> _Source:
    """Everything `src` holds, lazily, under release names (umT5 under HF names)."""
    from vidmoe.io.components import open_expert_file
    from vidmoe.io.layouts import detect_layout

    if src.is_file():  # one expert (ComfyUI, release names, GGUF): copied without a config
        stem = src.stem.lower()
        name = next((e for e in ("high_noise", "low_noise") if e in stem), "dense")
        return _Source(config=None, experts={name: FP8Source(open_expert_file(src).tensors)})
    layout = detect_layout(src)
    experts = {n: FP8Source(layout.expert_tensors(n)) for n in layout.experts}
    vae = layout.vae_tensors()
    kind, notes = layout.config.text_encoder, ()
    text = None
    if kind == "umt5-xxl" and layout.text_encoder is not None:
        text = _umt5_source(layout.text_encoder)
        if layout.tokenizer is None:
            notes = (f"tokenizer: {src} has none beside its umT5; add it before loading",)
    elif kind == "umt5-xxl":
        notes = (f"text encoder: {src} holds no umT5 weights; load with --text-encoder FILE",)
    return _Source(
        config=layout.config,
        experts=experts,
        vae=vae,
        text_encoder=text,
        tokenizer=layout.tokenizer if text is not None else None,
        notes=notes,
    )


def _without_first_frame_head(source: _Source, layout: str) -> _Source:
    """`source` less its VAE's first-frame head (vidmoe's own, as the demo's VAE has one: other
    layouts have no place for it), with a note saying so; `source` itself where there is none."""
    from vidmoe.models.vae import FIRST_FRAME_HEAD as head

    if source.vae is None or not any(n.startswith(head) for n in source.vae):
        return source
    kept = {n: n for n in source.vae if not n.startswith(head)}
    note = (
        f"vae: its first-frame head is vidmoe's own and a {layout} VAE has no place for it: left "
        "out, so frame 0 decodes as the VAE without it draws it"
    )
    return replace(source, vae=_AliasSource(source.vae, kept), notes=(*source.notes, note))


def check_quantize(layout: str, quantize: str | None) -> None:
    """Refuse a `--quantize` the layout cannot store, before anything is read."""
    from vidmoe.io.gguf import GGUF_QUANTIZE, gguf_quant_type

    if layout not in CONVERT_LAYOUTS:
        raise ValueError(f"--layout must be one of {', '.join(CONVERT_LAYOUTS)}; got {layout!r}")
    if layout == "gguf":
        if quantize == "fp8":
            raise ValueError(
                "--quantize fp8 is ComfyUI's fp8_scaled safetensors, not a GGUF type: use "
                f"--layout comfyui --quantize fp8, or a GGUF type ({', '.join(GGUF_QUANTIZE)})"
            )
        gguf_quant_type(quantize)
    elif quantize not in (None, "fp8"):
        raise ValueError(
            f"--quantize {quantize!r}: --layout {layout} stores fp8 (ComfyUI fp8_scaled) or the "
            f"source's own precision; GGUF types ({', '.join(GGUF_QUANTIZE)}) need --layout gguf"
        )


def convert(
    src: str | Path, dst: str | Path, *, layout: str, quantize: str | None = None
) -> Converted:
    """Write the checkpoint at `src` to `dst` in `layout` (one of CONVERT_LAYOUTS).

    Folder layouts (official, diffusers, vidmoe) need a source with a VAE (a model folder).
    `comfyui` and `gguf` write one file per expert (`dst` that file for a one-expert source,
    else a folder of `<expert>.safetensors|.gguf`, `vae.safetensors`, the umT5 file and
    `tokenizer/`). The umT5 encoder is written in each layout's form: official
    `models_t5_umt5-xxl-enc-bf16.safetensors` + `google/umt5-xxl/`; diffusers and vidmoe
    `text_encoder/` + `tokenizer/`; comfyui and gguf ComfyUI's `umt5_xxl_<dtype>.safetensors`
    (HF names) + `tokenizer/`. `quantize`: 'fp8' (fp8_scaled block linears, not with gguf), or
    for gguf a GGUF type (`vidmoe.io.gguf.GGUF_QUANTIZE`; None keeps each tensor's float type).
    """
    check_quantize(layout, quantize)
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"SRC and DST are the same path ({src}); give a new DST")
    source = _read_source(src)
    if layout != "vidmoe":
        source = _without_first_frame_head(source, layout)
    if layout in SINGLE_FILE_LAYOUTS:
        return _write_single_files(source, src, dst, layout=layout, quantize=quantize)
    if source.config is None or source.vae is None:
        raise ValueError(
            f"{src} is a single expert without a VAE: it converts only to --layout comfyui or "
            f"gguf; to write a {layout} folder, convert a model folder"
        )
    kind = source.config.text_encoder
    if kind != "umt5-xxl" and layout != "vidmoe":
        raise ValueError(
            f"{src} uses the text encoder {kind!r}, built into vidmoe: a {layout} folder holds "
            "umT5 only, so it would not load; convert to --layout vidmoe, or to comfyui/gguf "
            "for the experts and the VAE alone"
        )
    files = _write_folder(source, dst, layout=layout, quantize=quantize)
    return Converted(path=dst, files=files, notes=source.notes)


def _write_folder(source: _Source, dst: Path, *, layout: str, quantize: str | None) -> dict:
    from vidmoe.io import writers
    from vidmoe.io.layouts import RELEASE_T5_SAFETENSORS, RELEASE_TOKENIZER_DIR, detect_layout

    config = source.config
    experts = {n: writers.fp8_scaled(t, quantize) for n, t in source.experts.items()}
    if layout == "vidmoe":
        writers.write_vidmoe_layout(dst, config=config, experts=experts, vae=source.vae)
    elif layout == "official":
        writers.write_official_layout(
            dst,
            experts=experts,
            transformer=config.transformer,
            vae=source.vae,
            vae_generation=config.vae.generation,
            release_pickles=False,
        )
    else:
        boundary = config.moe.boundaries[0] if config.moe.boundaries else None
        writers.write_diffusers_layout(
            dst,
            experts=experts,
            transformer=config.transformer,
            vae=source.vae,
            vae_config=config.vae,
            boundary_ratio=boundary,
        )
    if source.text_encoder is not None:
        if layout == "official":
            text = dst / RELEASE_T5_SAFETENSORS
            writers.save_safetensors_atomic(dict(source.text_encoder.items()), text)
            tokenizer = dst / RELEASE_TOKENIZER_DIR
        else:
            writers.write_text_encoder_folder(source.text_encoder, dst / "text_encoder")
            tokenizer = dst / "tokenizer"
        if source.tokenizer is not None:
            writers.copy_tree_atomic(source.tokenizer, tokenizer)
        if layout == "diffusers":
            _index_text_encoder(dst, source.tokenizer)
    return detect_layout(dst).files()  # read back: the folder is what its loader sees


def _index_text_encoder(root: Path, tokenizer: Path | None) -> None:
    """Name the text encoder (and tokenizer) in a diffusers model_index.json, as Wan's does."""
    from vidmoe.io.atomic import write_text_atomic

    index = json.loads((root / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "UMT5EncoderModel"]
    if tokenizer is not None:
        tok_config = tokenizer / "tokenizer_config.json"
        cls = (
            json.loads(tok_config.read_text()).get("tokenizer_class")
            if tok_config.is_file()
            else None
        )
        index["tokenizer"] = ["transformers", cls or "T5TokenizerFast"]
    write_text_atomic(json.dumps(index, indent=2, sort_keys=True), root / "model_index.json")


def _write_single_files(
    source: _Source, src: Path, dst: Path, *, layout: str, quantize: str | None
) -> Converted:
    """comfyui / gguf: one file per expert; in a folder, the VAE, umT5 and tokenizer beside."""
    from vidmoe.io import writers
    from vidmoe.io.gguf import write_gguf_expert

    suffix = SINGLE_FILE_LAYOUTS[layout]

    def write_expert(tensors: TensorSource, path: Path) -> Path:
        if layout == "gguf":
            return write_gguf_expert(tensors, path, quantize=quantize)
        return writers.write_comfyui_file(writers.fp8_scaled(tensors, quantize), path)

    if dst.suffix == suffix and len(source.experts) == 1:
        ((name, tensors),) = source.experts.items()
        path = write_expert(tensors, dst)
        return Converted(path=path, files={f"expert.{name}": str(path)}, notes=source.notes)
    if dst.suffix:
        raise ValueError(
            f"{src} holds {len(source.experts)} expert(s) and more: DST must be a folder, not "
            f"{dst.name} (a single {suffix} file is for a one-expert source)"
        )
    files = {
        f"expert.{n}": str(write_expert(t, dst / f"{n}{suffix}")) for n, t in source.experts.items()
    }
    if source.vae is not None:
        vae = writers.save_safetensors_atomic(dict(source.vae.items()), dst / "vae.safetensors")
        files["vae"] = str(vae)
    notes = source.notes
    if source.config is not None and source.config.text_encoder != "umt5-xxl":
        kind = source.config.text_encoder
        notes += (f"text encoder: {kind!r} is built into vidmoe; no weights to write",)
    if source.text_encoder is not None:
        dtype = source.text_encoder.dtype(next(iter(source.text_encoder)))
        tag = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
        text = dst / f"umt5_xxl_{tag}.safetensors"
        files["text_encoder"] = str(
            writers.save_safetensors_atomic(dict(source.text_encoder.items()), text)
        )
        if source.tokenizer is not None:
            files["tokenizer"] = str(writers.copy_tree_atomic(source.tokenizer, dst / "tokenizer"))
    return Converted(path=dst, files=files, notes=notes)
