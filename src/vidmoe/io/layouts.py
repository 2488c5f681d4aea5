"""Checkpoint layouts on disk: detect which one a path holds, and what model config it implies.

Four layouts are read: the official release folders, diffusers folders, ComfyUI single files and
vidmoe's own folders. `detect_layout` never guesses silently: an unknown folder is an error that
lists what it found and what each layout needs. `Layout` hands out every part under release names.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from vidmoe.config import ModelConfig, TransformerConfig, VAEConfig
from vidmoe.io import keymaps
from vidmoe.io.tensors import RenamedSource, SafetensorsFile, TensorSource, open_tensors
from vidmoe.presets import (
    PRESETS,
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
)

LAYOUT_KINDS = ("official", "diffusers", "comfyui", "vidmoe")
LAYOUT_NEEDS = {
    "official": "high_noise_model/ and low_noise_model/ (each config.json + *.safetensors or "
    "*.safetensors.index.json), or config.json + safetensors at the top (ti2v-5B); and "
    "Wan2.1_VAE.pth or Wan2.2_VAE.pth (optional: models_t5_umt5-xxl-enc-bf16.pth or .safetensors, "
    "google/umt5-xxl/)",
    "diffusers": "model_index.json, transformer/ (+ transformer_2/ for two experts), vae/ "
    "(optional: text_encoder/, tokenizer/)",
    "comfyui": "a single .safetensors file of one expert, release names with or without a "
    "'model.diffusion_model.' / 'diffusion_model.' prefix",
    "vidmoe": "vidmoe.json, experts/<name>.safetensors per expert, vae.safetensors "
    "(optional: text_encoder/, tokenizer/)",
}
RELEASE_VAE_FILES = {
    "Wan2.1_VAE.pth": "2.1",
    "Wan2.2_VAE.pth": "2.2",
    # as `vidmoe convert --layout official` writes them: safetensors, never pickles
    "Wan2.1_VAE.safetensors": "2.1",
    "Wan2.2_VAE.safetensors": "2.2",
}
RELEASE_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
RELEASE_T5_SAFETENSORS = "models_t5_umt5-xxl-enc-bf16.safetensors"  # as `convert` writes it
RELEASE_TOKENIZER_DIR = "google/umt5-xxl"
# parity: every released Wan transformer uses 128-wide attention heads; a ComfyUI file does not
# store the head count, so it is dim / 128.
RELEASE_HEAD_DIM = 128


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Where each part of a checkpoint lies, how its tensors are named, and the config implied."""

    kind: str
    """One of LAYOUT_KINDS."""
    root: Path
    """The folder (or, for ComfyUI, the file) that was detected."""
    experts: dict[str, Path]
    """Expert name (`high_noise`, `low_noise`, or `dense`) -> weights file or index json."""
    vae: Path | None
    """VAE weights (None when the layout has none, as a ComfyUI file)."""
    text_encoder: Path | None = None
    """umT5 weights file or folder, if present."""
    tokenizer: Path | None = None
    """Tokenizer folder, if present."""
    config: ModelConfig
    """The model configuration the files imply."""
    naming: str = "release"
    """Tensor names in the files: 'release', 'diffusers' or 'comfyui' (prefixed release)."""
    notes: tuple[str, ...] = ()
    """What was inferred rather than read (shown by `vidmoe info`)."""

    def files(self) -> dict[str, str]:
        """Component -> the file or folder it is read from: `expert.<name>`, `vae`, and
        `text_encoder`, `tokenizer` where the checkpoint holds them."""
        files = {f"expert.{n}": str(p) for n, p in self.experts.items()}
        parts = {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer}
        return files | {k: str(p) for k, p in parts.items() if p is not None}

    def expert_tensors(self, name: str) -> TensorSource:
        """One expert's tensors, lazily, under release names."""
        if name not in self.experts:
            raise ValueError(f"no expert {name!r} in {self.root}; it has {list(self.experts)}")
        source = open_tensors(self.experts[name])
        rename = {
            "release": None,
            "comfyui": keymaps.strip_comfyui_prefix,
            "diffusers": keymaps.transformer_to_release,
        }[self.naming]
        return RenamedSource(source, rename) if rename else source

    def vae_tensors(self) -> TensorSource:
        """The VAE's tensors, lazily, under release names."""
        if self.vae is None:
            raise ValueError(f"the {self.kind} checkpoint {self.root} holds no VAE weights")
        source = open_tensors(self.vae)
        if self.kind == "diffusers":
            return RenamedSource(source, keymaps.vae_renamer(self.config.vae, to_diffusers=False))
        return source


def detect_layout(path: str | Path) -> Layout:
    """Detect the checkpoint layout at `path` (a folder, or a ComfyUI .safetensors file)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint path {path} does not exist")
    if path.is_file():
        if path.suffix == ".safetensors":
            return _comfyui(path)
        raise ValueError(f"{path} is a file but not .safetensors; {_accepted()}")
    if (path / "vidmoe.json").is_file():
        return _vidmoe(path)
    if (path / "model_index.json").is_file():
        return _diffusers(path)
    official = (*RELEASE_VAE_FILES, "high_noise_model", "low_noise_model")
    if any((path / f).exists() for f in official):
        return _official(path)
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    raise ValueError(
        f"{path} is not a known checkpoint layout; it holds {found[:20]}"
        f"{' ...' if len(found) > 20 else ''}. {_accepted()}"
    )


def _accepted() -> str:
    return "Accepted layouts: " + "; ".join(f"{k}: {v}" for k, v in LAYOUT_NEEDS.items())


def _weights_in(folder: Path) -> Path:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    singles = sorted(folder.glob("*.safetensors"))
    if len(indexes) == 1:
        return indexes[0]
    if not indexes and len(singles) == 1:
        return singles[0]
    raise ValueError(
        f"{folder} needs one *.safetensors.index.json or one *.safetensors file; found "
        f"{[p.name for p in indexes + singles] or 'none'}"
    )


def read_json(path: Path, what: str = "") -> dict:
    """A JSON file's contents; a missing or invalid file is a ValueError naming it (as `what`)."""
    label = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise ValueError(f"{label} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{label} is not valid JSON: {e}") from None


def _official(root: Path) -> Layout:
    pairs = {"high_noise": root / "high_noise_model", "low_noise": root / "low_noise_model"}
    if any(p.is_dir() for p in pairs.values()):
        folders = pairs
    elif (root / "config.json").is_file():
        folders = {"dense": root}
    else:
        raise ValueError(f"{root} has a release VAE but no experts. {_accepted()}")
    configs = {}
    for name, folder in folders.items():
        if not folder.is_dir():
            raise ValueError(f"official checkpoint {root} lacks {folder.name}/")
        configs[name] = keymaps.transformer_config_from_release(read_json(folder / "config.json"))
    transformer = _same_config(configs, root)
    vae_files = [root / f for f in RELEASE_VAE_FILES if (root / f).is_file()]
    if not vae_files:
        raise ValueError(f"official checkpoint {root} lacks {' or '.join(RELEASE_VAE_FILES)}")
    if len(vae_files) > 1:  # keep the one the transformer's channel count asks for
        want = "2.2" if transformer.out_dim == 48 else "2.1"
        vae_files = [f for f in vae_files if RELEASE_VAE_FILES[f.name] == want][:1] or vae_files[:1]
    vae, notes = vae_config_from_shapes(open_tensors(vae_files[0]))
    t5, tok = root / RELEASE_T5_FILE, root / RELEASE_TOKENIZER_DIR
    if not t5.is_file():
        t5 = root / RELEASE_T5_SAFETENSORS
    config, more = implied_config(root.name, transformer, vae, list(folders))
    return Layout(
        kind="official",
        root=root,
        experts={n: _weights_in(f) for n, f in folders.items()},
        vae=vae_files[0],
        text_encoder=t5 if t5.is_file() else None,
        tokenizer=tok if tok.is_dir() else None,
        config=config,
        notes=notes + more,
    )


def _same_config(configs: dict[str, TransformerConfig], root: Path) -> TransformerConfig:
    first = next(iter(configs.values()))
    if any(c != first for c in configs.values()):
        fields = [
            f
            for f, v in first.to_dict().items()
            if any(c.to_dict()[f] != v for c in configs.values())
        ]
        detail = "; ".join(
            f"{f}: " + ", ".join(f"{n}={c.to_dict()[f]}" for n, c in configs.items())
            for f in fields
        )
        raise ValueError(
            f"the experts in {root} must share one architecture; they differ in {detail}"
        )
    return first


def _diffusers(root: Path) -> Layout:
    index = read_json(root / "model_index.json")

    def present(component: str) -> bool:
        entry = index.get(component)
        return bool(entry and entry[0] is not None and (root / component).is_dir())

    if not present("transformer") or not present("vae"):
        raise ValueError(f"diffusers checkpoint {root} needs transformer/ and vae/ components")
    folders = {"dense": root / "transformer"}
    boundary = index.get("boundary_ratio")
    if present("transformer_2"):
        if boundary is None:
            raise ValueError(
                f"{root} has transformer_2/ but model_index.json has no boundary_ratio"
            )
        # diffusers runs `transformer` while t >= boundary * 1000: it is the high-noise expert.
        folders = {"high_noise": root / "transformer", "low_noise": root / "transformer_2"}
    model_type = "ti2v" if index.get("expand_timesteps") else None
    configs = {
        n: keymaps.transformer_config_from_diffusers(
            read_json(f / "config.json"), model_type=model_type
        )
        for n, f in folders.items()
    }
    vae = keymaps.vae_config_from_diffusers(read_json(root / "vae" / "config.json"))
    scheduler = root / "scheduler" / "scheduler_config.json"
    shift = read_json(scheduler).get("flow_shift") if scheduler.is_file() else None
    config, notes = implied_config(
        root.name,
        _same_config(configs, root),
        vae,
        list(folders),
        boundaries=(boundary,) if len(folders) == 2 else (),
        shift=shift,
    )
    return Layout(
        kind="diffusers",
        root=root,
        experts={n: _weights_in(f) for n, f in folders.items()},
        vae=_weights_in(root / "vae"),
        text_encoder=root / "text_encoder" if present("text_encoder") else None,
        tokenizer=root / "tokenizer" if present("tokenizer") else None,
        config=config,
        naming="diffusers",
        notes=notes,
    )


def _comfyui(path: Path) -> Layout:
    source = SafetensorsFile(path)
    names = list(source)
    if any(n.startswith(keymaps.COMFYUI_PREFIXES) for n in names):
        naming = "comfyui"
    elif "head.modulation" in source:
        naming = "release"
    else:
        raise ValueError(
            f"{path} holds neither release Wan transformer names (e.g. 'head.modulation') nor "
            f"prefixed ComfyUI ones; first names: {names[:5]}. {_accepted()}"
        )
    renamed = RenamedSource(source, keymaps.strip_comfyui_prefix)
    transformer, notes = transformer_config_from_shapes(renamed)
    stem = path.stem.lower()
    expert = next((e for e in ("high_noise", "low_noise") if e in stem), "dense")
    notes += (f"expert name {expert!r} taken from the file name",)
    vae = PRESETS["ti2v-5B" if transformer.out_dim == 48 else "t2v-A14B"].vae
    notes += (f"no VAE in the file; the config assumes the released Wan{vae.generation} VAE",)
    config, more = implied_config(path.stem, transformer, vae, [expert])
    return Layout(
        kind="comfyui",
        root=path,
        experts={expert: path},
        vae=None,
        config=config,
        naming=naming,
        notes=notes + more,
    )


def _vidmoe(root: Path) -> Layout:
    try:
        config = ModelConfig.from_json((root / "vidmoe.json").read_text())
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{root / 'vidmoe.json'} is not a vidmoe model config: {e!r}") from None
    experts = {n: root / "experts" / f"{n}.safetensors" for n in config.moe.expert_names}
    missing = [str(p.relative_to(root)) for p in experts.values() if not p.is_file()]
    if not (root / "vae.safetensors").is_file():
        missing.append("vae.safetensors")
    if missing:
        raise ValueError(f"vidmoe checkpoint {root} lacks {missing}")
    te, tok = root / "text_encoder", root / "tokenizer"
    return Layout(
        kind="vidmoe",
        root=root,
        experts=experts,
        vae=root / "vae.safetensors",
        text_encoder=te if te.exists() else None,
        tokenizer=tok if tok.is_dir() else None,
        config=config,
    )


def implied_config(
    name: str,
    transformer: TransformerConfig,
    vae: VAEConfig,
    expert_names: list[str],
    *,
    boundaries: tuple[float, ...] | None = None,
    shift: float | None = None,
) -> tuple[ModelConfig, tuple[str, ...]]:
    """The `ModelConfig` of a checkpoint: its own architecture, sampling defaults of the release
    preset with the same task (t2v-A14B, i2v-A14B; ti2v-5B for one dense expert)."""
    if len(expert_names) == 1:
        preset = PRESETS["ti2v-5B"]
    else:
        preset = PRESETS["i2v-A14B" if transformer.model_type == "i2v" else "t2v-A14B"]
    moe = dataclasses.replace(
        preset.moe,
        expert_names=tuple(expert_names),
        boundaries=preset.moe.boundaries if boundaries is None else boundaries,
    )
    scheduler = (
        preset.scheduler if shift is None else dataclasses.replace(preset.scheduler, shift=shift)
    )
    notes = [f"guidance and sampling defaults from the {preset.name} preset"]
    sizes = preset.sizes
    if transformer != preset.transformer:
        sizes = ()
        notes.append(f"architecture differs from {preset.name}: any size is accepted")
    config = dataclasses.replace(
        preset,
        name=name,
        transformer=transformer,
        vae=vae,
        moe=moe,
        scheduler=scheduler,
        sizes=sizes,
    )
    return config, tuple(notes)


def transformer_config_from_shapes(src: TensorSource) -> tuple[TransformerConfig, tuple[str, ...]]:
    """Infer a transformer config from release-named tensor shapes (for files without config)."""
    needed = (
        "patch_embedding.weight",
        "head.head.weight",
        "blocks.0.ffn.0.weight",
        "text_embedding.0.weight",
        "time_embedding.0.weight",
    )
    missing = [n for n in needed if n not in src]
    if missing:
        raise ValueError(f"cannot infer the transformer config: tensors {missing} are missing")
    dim, in_dim, *patch = src.shape("patch_embedding.weight")  # [D, C_in, pf, ph, pw]
    if dim % RELEASE_HEAD_DIM:
        raise ValueError(
            f"width {dim} is not a multiple of {RELEASE_HEAD_DIM}: the head count (not stored in "
            "the file) cannot be inferred as dim / 128"
        )
    out_dim = src.shape("head.head.weight")[0] // math.prod(patch)
    model_type = "i2v" if in_dim != out_dim else ("ti2v" if out_dim == 48 else "t2v")
    cfg = TransformerConfig(
        model_type=model_type,
        patch_size=tuple(patch),
        in_dim=in_dim,
        dim=dim,
        ffn_dim=src.shape("blocks.0.ffn.0.weight")[0],
        freq_dim=src.shape("time_embedding.0.weight")[1],
        text_dim=src.shape("text_embedding.0.weight")[1],
        out_dim=out_dim,
        num_heads=dim // RELEASE_HEAD_DIM,
        num_layers=1 + max(int(n.split(".")[1]) for n in src if n.startswith("blocks.")),
        qk_norm="blocks.0.self_attn.norm_q.weight" in src,
        cross_attn_norm="blocks.0.norm3.weight" in src,
        pooled_text="text_pool.0.weight" in src,
    )
    notes = (
        f"num_heads = dim / {RELEASE_HEAD_DIM} = {cfg.num_heads} (not stored in the file)",
        f"model_type {model_type!r} inferred from in/out channels {in_dim}/{out_dim}",
    )
    return cfg, notes


def vae_config_from_shapes(src: TensorSource) -> tuple[VAEConfig, tuple[str, ...]]:
    """Infer a VAE config from release-named tensor shapes (the release `.pth` has no config)."""
    if "encoder.conv1.weight" not in src or "conv2.weight" not in src:
        raise ValueError("cannot infer the VAE config: not a release Wan VAE state dict")
    dim, z_dim = src.shape("encoder.conv1.weight")[0], src.shape("conv2.weight")[0]
    nested = "encoder.downsamples.0.downsamples.0.residual.2.weight" in src
    # Group the encoder's blocks per level: (kind, name prefix) in order.
    levels: list[list[str]] = [[]]
    flat = sorted({int(n.split(".")[2]) for n in src if n.startswith("encoder.downsamples.")})
    for k in flat:
        if nested:
            inner = sorted(
                {int(n.split(".")[4]) for n in src if n.startswith(f"encoder.downsamples.{k}.")}
            )
            levels[-1] = [f"encoder.downsamples.{k}.downsamples.{j}." for j in inner]
            levels.append([])
        else:
            levels[-1].append(f"encoder.downsamples.{k}.")
            if f"encoder.downsamples.{k}.resample.1.weight" in src:
                levels.append([])
    levels = [lv for lv in levels if lv]
    dim_mult = tuple(src.shape(lv[0] + "residual.2.weight")[0] // dim for lv in levels)
    num_res = sum(p + "residual.2.weight" in src for p in levels[0])
    temporal = tuple(lv[-1] + "time_conv.weight" in src for lv in levels[:-1])
    dec_dim = src.shape("decoder.conv1.weight")[0] // dim_mult[-1]
    generation = "2.2" if nested else "2.1"
    release = {
        ("2.1", 96, 16): (WAN21_LATENTS_MEAN, WAN21_LATENTS_STD),
        ("2.2", 160, 48): (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD),
    }
    mean, std = release.get((generation, dim, z_dim), ((), ()))
    cfg = VAEConfig(
        generation=generation,
        dim=dim,
        dec_dim=dec_dim if nested else None,
        z_dim=z_dim,
        dim_mult=dim_mult,
        num_res_blocks=num_res,
        temperal_downsample=temporal,
        latents_mean=mean,
        latents_std=std,
    )
    notes = ("VAE architecture inferred from tensor shapes",)
    if not mean:
        notes += ("not a released VAE size: latent normalisation is identity",)
    return cfg, notes
