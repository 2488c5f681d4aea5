"""Build a latent cache (`vidmoe cache`): clips from a video folder or from the demo's shapes world,
encoded once by a model's VAE and text encoder, so that training never runs either.

The cache format is `vidmoe.training.data.build_latent_cache`'s: safetensors shards of latents
and text embeddings, the empty prompt's embedding and `index.json`.
Shape letters: T frames, H, W pixels, Z latent channels.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

VAE_FILE = "vae.safetensors"
VAE_CONFIG_FILE = "vae_config.json"


@dataclass(frozen=True, kw_only=True)
class CacheSource:
    """Which clips a cache holds: a folder of captioned videos, or clips of the demo world."""

    videos: Path | None = None
    """A folder of mp4 files plus metadata.jsonl or metadata.csv (`VideoFolderDataset`); None:
    the demo's shapes world (`vidmoe.world.shapes.demo_world`)."""
    start: int = 0
    """The first clip (world clip index, or row of the folder's metadata)."""
    clips: int = 0
    """How many clips; 0: every video of the folder (the world needs a number)."""
    captions: int = 1
    """Phrasings per world clip (`ShapesWorld.captions`; training draws one per sample); a
    folder's metadata gives its own ("caption" or "captions")."""
    vocabulary: str = "base"
    """The world's caption vocabulary: "base", "extended" or "rich" (`vidmoe.world.labels`)."""
    num_frames: int = 0
    """Frames per video clip (folder only); 0: the model's default."""
    width: int = 0
    """Width videos are resized to (folder only); 0: the model's default."""
    height: int = 0
    """Height videos are resized to (folder only); 0: the model's default."""

    def __post_init__(self) -> None:
        if self.start < 0 or self.clips < 0:
            raise ValueError(f"start and clips must be >= 0; got {self.start} and {self.clips}")
        if self.videos is None and self.clips < 1:
            raise ValueError("the shapes world is endless: give the number of clips (--clips N)")
        if self.captions < 1:
            raise ValueError(f"captions must be >= 1 (phrasings per clip); got {self.captions}")
        if self.videos is not None and self.captions != 1:
            raise ValueError(
                f"captions={self.captions} applies to the shapes world; a video folder's "
                'metadata gives each clip\'s phrasings ("captions": [...] per row)'
            )


class _Clips:
    """The source's clips as an iterable with a length (for the progress bar)."""

    def __init__(self, source: CacheSource, config) -> None:
        self.source = source
        if source.videos is None:
            from vidmoe.world.shapes import demo_world

            self.world, self.dataset = demo_world(source.vocabulary), None
            self.count = source.clips
        else:
            from vidmoe.training.data import VideoFolderDataset

            width, height = config.default_size
            self.world = None
            self.dataset = VideoFolderDataset(
                source.videos,
                num_frames=source.num_frames or config.default_num_frames,
                width=source.width or width,
                height=source.height or height,
            )
            left = max(len(self.dataset) - source.start, 0)
            self.count = min(source.clips, left) if source.clips else left
            if self.count < 1:
                raise ValueError(
                    f"{source.videos} has {len(self.dataset)} videos; none from row {source.start}"
                )

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict | None]:
        for i in range(self.source.start, self.source.start + self.count):
            if self.dataset is not None:
                yield self.dataset[i]  # None: a video that failed (logged, counted as skipped)
                continue
            clip = self.world.sample(i)
            if self.source.captions == 1:
                yield {"video": clip.video, "caption": clip.caption}  # (3, T, H, W)
            else:
                yield {
                    "video": clip.video,
                    "captions": self.world.captions(i, self.source.captions),
                }


def vae_folder_config(path: str | Path):
    """The VAEConfig a folder states: its `vae_config.json` (what `vidmoe train-vae` writes) or
    a vidmoe model folder's `vidmoe.json`; None when it has neither."""
    from vidmoe.config import ModelConfig, VAEConfig

    folder = Path(path)
    if (folder / VAE_CONFIG_FILE).is_file():
        return VAEConfig(**json.loads((folder / VAE_CONFIG_FILE).read_text()))
    if (folder / "vidmoe.json").is_file():
        return ModelConfig.from_json((folder / "vidmoe.json").read_text()).vae
    return None


def read_vae_folder(path: str | Path):
    """(VAEConfig, state dict) of a VAE folder: `vae.safetensors` beside `vae_config.json` (what
    `vidmoe train-vae` writes) or a vidmoe model folder (`vidmoe.json`)."""
    from safetensors.torch import load_file

    folder = Path(path)
    weights = folder / VAE_FILE
    config = vae_folder_config(folder)
    if config is None or not weights.is_file():
        raise ValueError(
            f"{folder} is not a VAE folder: it needs {VAE_FILE} and {VAE_CONFIG_FILE} (the "
            "out_dir of `vidmoe train-vae`) or a vidmoe model folder's vidmoe.json"
        )
    return config, load_file(str(weights))


def load_cache_encoders(model: str | Path | None, vae: str | Path | None, device: str = "cpu"):
    """The model's config, VAE (fp32, eval) and text encoder; `vae`, a VAE folder, replaces the
    model's VAE (the model still gives the text encoder and its text length)."""
    from vidmoe.io.checkpoints import detect_layout, load_vae
    from vidmoe.loading import DEMO_DIR
    from vidmoe.models.text_encoder import build_text_encoder
    from vidmoe.models.vae import WanVAE

    layout = detect_layout(Path(model) if model is not None else DEMO_DIR)
    config = layout.config
    if vae is None:
        encoder = load_vae(layout, device=device)
    else:
        vae_config, state = read_vae_folder(vae)
        encoder = WanVAE(vae_config)
        encoder.load_state_dict(state)
        encoder = encoder.to(device).eval().requires_grad_(False)
    text = build_text_encoder(
        config.text_encoder,
        layout.text_encoder,
        device=device,
        max_length=config.transformer.text_len,
    )
    return config, encoder, text


def build_cache(
    out_dir: str | Path,
    source: CacheSource,
    *,
    model: str | Path | None = None,
    vae: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    shard_size: int = 1024,
    progress: bool = False,
) -> Path:
    """Encode the source's clips with the VAE and text encoder of `model` (default: the shipped
    demo; `vae`: a VAE folder in place of its VAE) into a latent cache at `out_dir`.

    Returns the cache's index path. An existing cache at `out_dir` is refused (a cache is built
    once; remove it to build it again).
    """
    from vidmoe.training.data import CACHE_INDEX, build_latent_cache

    out_dir = Path(out_dir)
    if (out_dir / CACHE_INDEX).exists():
        raise ValueError(f"{out_dir} already holds a latent cache: remove it, or choose another")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1; got {batch_size}, {shard_size}")
    config, encoder, text = load_cache_encoders(model, vae, device)
    clips = _Clips(source, config)
    with torch.no_grad():
        return build_latent_cache(
            clips,
            encoder,
            text,
            out_dir,
            text_len=config.transformer.text_len,
            shard_size=shard_size,
            batch_size=batch_size,
            progress=progress,
        )
