"""Writing weights in each checkpoint layout (vidmoe's own, official, diffusers, ComfyUI).

Used by `vidmoe convert` and by tests that build tiny checkpoints. Tensors come in under release
names (any `Mapping`, lazy sources included) and are read one shard at a time; every file is
written atomically (`save_safetensors_atomic`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from vidmoe.config import ModelConfig, TransformerConfig, VAEConfig
from vidmoe.io import keymaps
from vidmoe.io.atomic import atomic_write, save_safetensors_atomic, write_text_atomic
from vidmoe.io.layouts import RELEASE_T5_FILE, RELEASE_TOKENIZER_DIR
from vidmoe.io.tensors import DictSource, RenamedSource, TensorSource

DEFAULT_SHARD_BYTES = 5 * 1024**3
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"


def _source(tensors: Mapping[str, torch.Tensor]) -> TensorSource:
    return tensors if isinstance(tensors, TensorSource) else DictSource(tensors)


def write_sharded_safetensors(
    tensors: Mapping[str, torch.Tensor],
    folder: str | Path,
    *,
    name: str = DIFFUSERS_WEIGHTS,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `<name>.safetensors`, or shards `<name>-0000i-of-0000n.safetensors` and the index
    `<name>.safetensors.index.json` when the tensors exceed `max_shard_bytes`.

    Returns:
        The single file, or the index json.
    """
    source, folder = _source(tensors), Path(folder)
    shards: list[list[str]] = [[]]
    size = 0
    for tensor_name in source:
        nbytes = source.nbytes(tensor_name)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor_name)
        size += nbytes
    if len(shards) == 1:
        one = {n: source[n] for n in shards[0]}
        return save_safetensors_atomic(one, folder / f"{name}.safetensors", metadata)
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"{name}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors_atomic({n: source[n] for n in names}, folder / file, metadata)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(source.nbytes(n) for n in source)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    return write_text_atomic(json.dumps(index, indent=2), folder / f"{name}.safetensors.index.json")


def _write_json(d: dict, path: Path) -> Path:
    return write_text_atomic(json.dumps(d, indent=2, sort_keys=True), path)


def save_torch_atomic(tensors: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write a plain state dict `.pth` (the release's VAE and T5 format), atomically."""
    state = {n: t.detach().cpu().contiguous() for n, t in _source(tensors).items()}
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def save_safetensors_dict(tensors: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """`save_safetensors_atomic` of any mapping (a lazy source is read whole)."""
    return save_safetensors_atomic(dict(_source(tensors).items()), path)


def _expert_folders(root: Path, names: list[str], kind: str) -> dict[str, Path]:
    """Where each expert goes: release `<name>_model/` or diffusers `transformer{,_2}/`."""
    if sorted(names) == ["high_noise", "low_noise"]:
        if kind == "diffusers":
            return {"high_noise": root / "transformer", "low_noise": root / "transformer_2"}
        return {n: root / f"{n}_model" for n in names}
    if names == ["dense"]:
        return {"dense": root / "transformer" if kind == "diffusers" else root}
    raise ValueError(
        f"the {kind} layout holds experts ['high_noise', 'low_noise'] or ['dense']; got {names}"
    )


def write_official_layout(
    root: str | Path,
    *,
    experts: Mapping[str, Mapping[str, torch.Tensor]],
    transformer: TransformerConfig,
    vae: Mapping[str, torch.Tensor],
    vae_generation: str,
    text_encoder: Mapping[str, torch.Tensor] | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    release_pickles: bool = True,
) -> Path:
    """Write the release folder: `{high,low}_noise_model/` (or the top level for one `dense`
    expert) with config.json and sharded safetensors, `Wan2.x_VAE.pth`, and optionally the T5
    `.pth` and `google/umt5-xxl/` tokenizer. `release_pickles=False` (what `vidmoe convert`
    writes) stores the VAE and T5 as `.safetensors` under the same stems instead of pickles;
    vidmoe reads both."""
    root = Path(root)
    suffix = ".pth" if release_pickles else ".safetensors"
    save = save_torch_atomic if release_pickles else save_safetensors_dict
    for name, folder in _expert_folders(root, list(experts), "official").items():
        _write_json(keymaps.transformer_config_to_release(transformer), folder / "config.json")
        write_sharded_safetensors(experts[name], folder, max_shard_bytes=max_shard_bytes)
    if vae_generation not in ("2.1", "2.2"):
        raise ValueError(f"vae_generation must be '2.1' or '2.2'; got {vae_generation!r}")
    save(vae, root / f"Wan{vae_generation}_VAE{suffix}")
    if text_encoder is not None:
        save(text_encoder, (root / RELEASE_T5_FILE).with_suffix(suffix))
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, root / RELEASE_TOKENIZER_DIR, dirs_exist_ok=True)
    return root


def write_diffusers_transformer(
    tensors: Mapping[str, torch.Tensor],
    config: TransformerConfig,
    folder: str | Path,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write one expert as a diffusers `WanTransformer3DModel` folder (config.json + weights)."""
    folder = Path(folder)
    _write_json(keymaps.transformer_config_to_diffusers(config), folder / "config.json")
    renamed = RenamedSource(_source(tensors), keymaps.transformer_to_diffusers)
    return write_sharded_safetensors(renamed, folder, max_shard_bytes=max_shard_bytes)


def write_diffusers_vae(
    tensors: Mapping[str, torch.Tensor], config: VAEConfig, folder: str | Path
) -> Path:
    """Write a release VAE state dict as a diffusers `AutoencoderKLWan` folder."""
    folder = Path(folder)
    _write_json(keymaps.vae_config_to_diffusers(config), folder / "config.json")
    renamed = RenamedSource(_source(tensors), keymaps.vae_renamer(config, to_diffusers=True))
    return save_safetensors_atomic(
        dict(renamed.items()), folder / f"{DIFFUSERS_WEIGHTS}.safetensors"
    )


def write_diffusers_layout(
    root: str | Path,
    *,
    experts: Mapping[str, Mapping[str, torch.Tensor]],
    transformer: TransformerConfig,
    vae: Mapping[str, torch.Tensor],
    vae_config: VAEConfig,
    boundary_ratio: float | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a diffusers pipeline folder: model_index.json, transformer/ (the high-noise expert),
    transformer_2/ (the low-noise expert), vae/ (no text encoder or tokenizer)."""
    root = Path(root)
    folders = _expert_folders(root, list(experts), "diffusers")
    if len(folders) == 2 and boundary_ratio is None:
        raise ValueError("two experts need a boundary_ratio for model_index.json")
    for name, folder in folders.items():
        write_diffusers_transformer(
            experts[name], transformer, folder, max_shard_bytes=max_shard_bytes
        )
    write_diffusers_vae(vae, vae_config, root / "vae")
    pipeline = "WanImageToVideoPipeline" if transformer.model_type == "i2v" else "WanPipeline"
    absent = [None, None]
    index = {
        "_class_name": pipeline,
        "boundary_ratio": boundary_ratio if len(folders) == 2 else None,
        "expand_timesteps": transformer.model_type == "ti2v",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"] if len(folders) == 2 else absent,
        "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": absent,
        "text_encoder": absent,
        "tokenizer": absent,
    }
    _write_json(index, root / "model_index.json")
    return root


def write_text_encoder_folder(
    tensors: Mapping[str, torch.Tensor],
    folder: str | Path,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write umT5 (HF names) as transformers / diffusers save it: `config.json` of a
    `UMT5EncoderModel` (read from the shapes) and `model.safetensors` or its shards."""
    from vidmoe.models.umt5 import umt5_config_from_state_dict

    source, folder = _source(tensors), Path(folder)
    config = umt5_config_from_state_dict({n: source.shape(n) for n in source})
    config.architectures = ["UMT5EncoderModel"]
    write_text_atomic(config.to_json_string(), folder / "config.json")
    return write_sharded_safetensors(source, folder, name="model", max_shard_bytes=max_shard_bytes)


def copy_tree_atomic(src: str | Path, dst: str | Path) -> Path:
    """Copy a folder (a tokenizer) so that `dst` appears whole or not at all."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise ValueError(f"{dst} exists: give a new destination")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def write_vidmoe_layout(
    root: str | Path,
    *,
    config: ModelConfig,
    experts: Mapping[str, Mapping[str, torch.Tensor]],
    vae: Mapping[str, torch.Tensor],
) -> Path:
    """Write vidmoe's own folder: vidmoe.json, experts/<name>.safetensors, vae.safetensors."""
    root = Path(root)
    if sorted(experts) != sorted(config.moe.expert_names):
        raise ValueError(
            f"experts {sorted(experts)} do not match the config's {list(config.moe.expert_names)}"
        )
    meta = {"format": "vidmoe", "config": config.name}
    for name, tensors in experts.items():
        save_safetensors_atomic(
            dict(_source(tensors).items()), root / "experts" / f"{name}.safetensors", meta
        )
    save_safetensors_atomic(dict(_source(vae).items()), root / "vae.safetensors", meta)
    write_text_atomic(config.to_json(), root / "vidmoe.json")
    return root


def write_comfyui_file(
    tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    prefix: str = "model.diffusion_model.",
    quantize: str | None = None,
) -> Path:
    """Write one expert as a ComfyUI single file (release names behind `prefix`); with
    `quantize="fp8"`, as ComfyUI's `fp8_scaled` files (see `FP8ScaledView`)."""
    if prefix and prefix not in keymaps.COMFYUI_PREFIXES:
        raise ValueError(f"prefix must be one of {keymaps.COMFYUI_PREFIXES} or ''; got {prefix!r}")
    from vidmoe.io.tensors import SCALED_FP8_MARKER

    source = fp8_scaled(tensors, quantize)
    # ComfyUI's marker stands unprefixed at the top of the file
    names = {n: n if n == SCALED_FP8_MARKER else prefix + n for n in source}
    return save_safetensors_atomic({names[n]: t for n, t in source.items()}, path)


class FP8ScaledView(TensorSource):
    """Release-named expert tensors as ComfyUI `fp8_scaled` stores them: each block linear weight
    (`vidmoe.models.fp8.BLOCK_LINEARS`) in float8_e4m3fn with `X.scale_weight` (one float32 per
    output channel) beside it, the `scaled_fp8` marker, every other tensor as it was."""

    def __init__(self, source: TensorSource) -> None:
        import re

        from vidmoe.io.tensors import SCALED_FP8_MARKER
        from vidmoe.models.fp8 import BLOCK_LINEARS

        self.source = source
        pattern = re.compile(
            r"blocks\.\d+\.(" + "|".join(map(re.escape, BLOCK_LINEARS)) + r")\.weight"
        )
        self._fp8 = {n for n in source if pattern.fullmatch(n) and len(source.shape(n)) == 2}
        self._names = [SCALED_FP8_MARKER]
        for n in source:
            self._names.append(n)
            if n in self._fp8:
                self._names.append(n[: -len(".weight")] + ".scale_weight")
        self._cache: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _quantized(self, weight: str) -> tuple[torch.Tensor, torch.Tensor]:
        from vidmoe.models.fp8 import quantize_weight

        if self._cache is None or self._cache[0] != weight:
            self._cache = (weight, quantize_weight(self.source[weight]))
        return self._cache[1]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name == self._names[0]:
            return torch.zeros(0, dtype=torch.float8_e4m3fn)
        if name.endswith(".scale_weight"):
            return self._quantized(name[: -len(".scale_weight")] + ".weight")[1]
        if name in self._fp8:
            return self._quantized(name)[0]
        return self.source[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        if name == self._names[0]:
            return (0,)
        if name.endswith(".scale_weight"):
            return self.source.shape(name[: -len(".scale_weight")] + ".weight")[:1]
        return self.source.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        if name == self._names[0] or name in self._fp8:
            return torch.float8_e4m3fn
        return torch.float32 if name.endswith(".scale_weight") else self.source.dtype(name)


def fp8_scaled(tensors: Mapping[str, torch.Tensor], quantize: str | None) -> TensorSource:
    """`tensors` as they are (quantize None) or as an `FP8ScaledView` (quantize 'fp8')."""
    if quantize not in (None, "fp8"):
        raise ValueError(f"quantize must be None or 'fp8'; got {quantize!r}")
    return FP8ScaledView(_source(tensors)) if quantize else _source(tensors)
