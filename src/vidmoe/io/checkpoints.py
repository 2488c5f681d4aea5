"""Checkpoints into modules: strict, tensor-by-tensor loading, and whole models from any layout.

`load_into` copies a lazy tensor mapping into a module (also one built on the meta device, so no
second copy is made) and lists every missing, unexpected and mis-shaped name in one error.
`load_components` detects a checkpoint's layout and builds its experts, VAE and text encoder.
The readers (`open_tensors`, ...) live in `vidmoe.io.tensors`, the layouts in `vidmoe.io.layouts`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vidmoe.config import ModelConfig
from vidmoe.io.layouts import Layout, detect_layout
from vidmoe.io.tensors import DictSource, TensorSource, open_tensors

__all__ = [
    "LoadReport",
    "LoadedComponents",
    "Layout",
    "detect_layout",
    "load_components",
    "load_into",
    "open_tensors",
]


@dataclass(frozen=True)
class LoadReport:
    """What `load_into` did: tensors loaded, and the names it could not match."""

    loaded: int
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()

    def describe(self, limit: int = 10) -> str:
        parts = []
        for label, items in (
            ("missing from the checkpoint", self.missing),
            ("unexpected (not in the module)", self.unexpected),
            ("mis-shaped (name, module shape, checkpoint shape)", self.mismatched),
        ):
            if items:
                more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
                parts.append(f"{len(items)} {label}: {list(items[:limit])}{more}")
        return "; ".join(parts)


def load_into(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    device: torch.device | str | None = None,
) -> LoadReport:
    """Copy `tensors` (release names) into `module`'s parameters and persistent buffers.

    Each tensor is read, cast to its parameter's dtype and copied (or, for a parameter on the meta
    device, assigned on `device`, default CPU), one at a time. Mis-shaped tensors always raise;
    missing and unexpected names raise when `strict`. Non-persistent buffers of a meta module are
    left on meta: the module re-creates them.

    Returns:
        A `LoadReport` (with `strict=False`, the names that were skipped).
    """
    targets = module.state_dict(keep_vars=True)
    source = tensors if isinstance(tensors, TensorSource) else DictSource(tensors)
    report = check_names_and_shapes(targets, source, strict=strict, into=type(module).__name__)
    loaded = 0
    for name, target in targets.items():
        if name not in source:
            continue
        value = source[name]
        if target.is_meta:
            _assign(module, name, value.to(device=device or "cpu", dtype=target.dtype), target)
        else:
            with torch.no_grad():
                target.copy_(value)
        del value
        loaded += 1
    return LoadReport(
        loaded=loaded,
        missing=report.missing,
        unexpected=report.unexpected,
        mismatched=report.mismatched,
    )


def _assign(module: nn.Module, name: str, value: torch.Tensor, old: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        owner._buffers[leaf] = value


@dataclass
class LoadedComponents:
    """The modules of a loaded checkpoint, with the config and layout they came from."""

    config: ModelConfig
    experts: dict[str, nn.Module]
    vae: nn.Module
    text_encoder: object
    layout: str
    notes: tuple[str, ...] = field(default_factory=tuple)


QUANTIZE = (None, "fp8")


def load_expert(
    layout: Layout,
    name: str,
    *,
    device="cpu",
    dtype=torch.bfloat16,
    strict=True,
    quantize: str | None = None,
):
    """One expert transformer of `layout`, built on meta and filled tensor by tensor.

    Files in fp8 (plain e4m3, or ComfyUI `fp8_scaled` with a scale per weight) load dequantised
    to `dtype`; `quantize="fp8"` keeps the block linear layers in fp8 instead (`FP8Linear`),
    from fp8 files as they are and from float files quantised per output channel as they load.
    """
    return build_expert(
        layout.config.transformer_for(name),
        layout.expert_tensors(name),
        device=device,
        dtype=dtype,
        strict=strict,
        quantize=quantize,
    )


def build_expert(
    config,
    tensors: TensorSource,
    *,
    device="cpu",
    dtype=torch.bfloat16,
    strict=True,
    quantize: str | None = None,
    what: str = "",
):
    """An expert of architecture `config` (a `TransformerConfig`) from release-named `tensors`
    (see `load_expert`); `what` (a file name) starts any error message."""
    from vidmoe.io.tensors import FP8Source
    from vidmoe.models.fp8 import fp8_layer_names, quantize_fp8_
    from vidmoe.models.transformer import WanTransformer

    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be None or 'fp8'; got {quantize!r}")
    with torch.device("meta"):
        expert = WanTransformer(config).to(dtype)
    fp8_weights: set[str] = set()
    if quantize == "fp8":
        quantize_fp8_(expert)
        fp8_weights = {f"{n}.weight" for n in fp8_layer_names(expert)}
    try:
        source = FP8Source(tensors, fp8_weights)
        load_into(expert, source, strict=strict, device=device)
    except ValueError as e:
        if not what:
            raise
        raise ValueError(f"{what}: {e}") from None
    return expert.eval().requires_grad_(False)


def load_vae(layout: Layout, *, device="cpu", dtype=torch.float32, strict=True):
    """The VAE of `layout`, built on meta and filled tensor by tensor."""
    from vidmoe.models.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE(layout.config.vae).to(dtype)
    load_into(vae, layout.vae_tensors(), strict=strict, device=device)
    return vae.eval().requires_grad_(False)


def load_components(
    path: str | Path,
    *,
    device="cpu",
    dtype: torch.dtype = torch.bfloat16,
    strict: bool = True,
    quantize: str | None = None,
) -> LoadedComponents:
    """Detect the layout at `path` and load every expert, the VAE (fp32) and the text encoder."""
    from vidmoe.models.text_encoder import build_text_encoder

    layout = detect_layout(path)
    if layout.vae is None:
        raise ValueError(
            f"{path} is a {layout.kind} file with one expert and no VAE or text encoder; load it "
            "with `load_expert(detect_layout(path), name)`, or use a full checkpoint folder"
        )
    experts = {
        name: load_expert(
            layout, name, device=device, dtype=dtype, strict=strict, quantize=quantize
        )
        for name in layout.experts
    }
    vae = load_vae(layout, device=device, dtype=torch.float32, strict=strict)
    kind = layout.config.text_encoder
    text_path = layout.root if kind == "umt5-xxl" else layout.text_encoder
    # the encoder truncates to the transformer's text length, as the release does
    text = build_text_encoder(
        kind, text_path, device=device, max_length=layout.config.transformer.text_len
    )
    return LoadedComponents(
        config=layout.config,
        experts=experts,
        vae=vae,
        text_encoder=text,
        layout=layout.kind,
        notes=layout.notes,
    )


def check_names_and_shapes(
    targets: dict[str, torch.Tensor], source: TensorSource, *, strict: bool, into: str
) -> LoadReport:
    """The names and shapes of `source` against a module's state dict, before anything is read:
    a shape that differs is always a ValueError; with `strict`, a missing or unexpected name too.
    Returns the report (nothing loaded yet)."""
    report = LoadReport(
        loaded=0,
        missing=tuple(n for n in targets if n not in source),
        unexpected=tuple(n for n in source if n not in targets),
        mismatched=tuple(
            (n, tuple(t.shape), source.shape(n))
            for n, t in targets.items()
            if n in source and tuple(t.shape) != source.shape(n)
        ),
    )
    if report.mismatched or (strict and (report.missing or report.unexpected)):
        raise ValueError(f"cannot load weights into {into}: {report.describe()}")
    return report
