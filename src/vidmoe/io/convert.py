"""`vidmoe convert`: any layout vidmoe reads into any layout it writes, optionally fp8_scaled.

The source is read lazily under release names (fp8 files dequantised through `FP8Source`, GGUF
files through `GGUFSource`) and written one file at a time by `vidmoe.io.writers`.
"""

from __future__ import annotations

from pathlib import Path

from vidmoe.io.tensors import FP8Source, TensorSource

CONVERT_LAYOUTS = ("official", "diffusers", "comfyui", "vidmoe")


def _expert_sources(src: Path):
    """(config or None, {name: release-named float tensors}, VAE tensors or None)."""
    from vidmoe.io.components import open_expert_file
    from vidmoe.io.layouts import detect_layout

    if src.suffix == ".gguf":
        return None, {"dense": FP8Source(open_expert_file(src).tensors)}, None
    layout = detect_layout(src)
    experts = {n: FP8Source(layout.expert_tensors(n)) for n in layout.experts}
    vae = layout.vae_tensors() if layout.vae is not None else None
    return layout.config, experts, vae


def convert(src: str | Path, dst: str | Path, *, layout: str, quantize: str | None = None) -> Path:
    """Write the checkpoint at `src` to `dst` in `layout` (one of CONVERT_LAYOUTS).

    `comfyui` writes one `.safetensors` per expert (`dst` a file for one expert, else a folder
    holding `<expert>.safetensors` and, when the source has one, `vae.safetensors`). The other
    layouts need a source with a VAE (a model folder). `quantize="fp8"` stores the block linear
    weights as ComfyUI `fp8_scaled` does (a `scale_weight` per weight, the `scaled_fp8` marker),
    which vidmoe reads back from every layout. The text encoder is not written.
    """
    from vidmoe.io import writers

    if layout not in CONVERT_LAYOUTS:
        raise ValueError(f"--layout must be one of {', '.join(CONVERT_LAYOUTS)}; got {layout!r}")
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"SRC and DST are the same path ({src}); give a new DST")
    config, experts, vae = _expert_sources(src)
    out: dict[str, TensorSource] = {n: writers.fp8_scaled(t, quantize) for n, t in experts.items()}
    if layout == "comfyui":
        if len(out) == 1 and dst.suffix == ".safetensors":
            return writers.write_comfyui_file(next(iter(out.values())), dst)
        if dst.suffix:
            raise ValueError(
                f"{src} holds {len(out)} experts: DST must be a folder, not {dst.name}"
            )
        for name, tensors in out.items():
            writers.write_comfyui_file(tensors, dst / f"{name}.safetensors")
        if vae is not None:
            writers.save_safetensors_atomic(dict(vae.items()), dst / "vae.safetensors")
        return dst
    if config is None or vae is None:
        raise ValueError(
            f"{src} is a single expert without a VAE: it converts only to --layout comfyui; to "
            f"write a {layout} folder, convert a model folder"
        )
    if layout == "vidmoe":
        return writers.write_vidmoe_layout(dst, config=config, experts=out, vae=vae)
    if layout == "official":
        return writers.write_official_layout(
            dst,
            experts=out,
            transformer=config.transformer,
            vae=vae,
            vae_generation=config.vae.generation,
        )
    boundary = config.moe.boundaries[0] if config.moe.boundaries else None
    return writers.write_diffusers_layout(
        dst,
        experts=out,
        transformer=config.transformer,
        vae=vae,
        vae_config=config.vae,
        boundary_ratio=boundary,
    )
