"""Training data: a folder of captioned videos, and the latent cache the experts train from.

A video folder holds mp4 files plus `metadata.jsonl` ({"file", "caption"} per line) or
`metadata.csv` (columns file, caption): the format `vidmoe.world.shapes.write_dataset` writes.
The cache holds VAE latents and text embeddings, computed once, in safetensors shards plus an
`index.json`; training then never runs the VAE or the text encoder.
Shape letters: N clips, Z latent channels, F/H/W latent grid, T frames, S text tokens, D width.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

log = logging.getLogger(__name__)

CACHE_INDEX = "index.json"
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"


class VideoFolderDataset(torch.utils.data.Dataset):
    """Captioned videos of a folder, decoded, resized to (H, W) and cut to `num_frames`.

    A file that fails to decode, or is shorter than `num_frames`, is reported (logged and kept in
    `skipped`) and `__getitem__` returns None for it; `collate_videos` and the cache drop Nones.
    """

    def __init__(self, folder: str | Path, *, num_frames: int, width: int, height: int):
        self.folder = Path(folder)
        self.num_frames, self.width, self.height = num_frames, width, height
        self.items = read_metadata(self.folder)
        self.skipped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict | None:
        from vidmoe.io.video import read_video

        name, caption = self.items[index]
        try:
            frames, _ = read_video(self.folder / name)  # (T, H0, W0, 3) uint8
            if frames.shape[0] < self.num_frames:
                raise ValueError(f"has {frames.shape[0]} frames; need {self.num_frames}")
        except (ValueError, OSError) as e:
            self.skipped.append((name, str(e)))
            log.warning("skipping video %s: %s", name, e)
            return None
        video = torch.from_numpy(frames[: self.num_frames]).float() / 127.5 - 1.0
        video = rearrange(video, "t h w c -> t c h w")  # (T, 3, H0, W0)
        if video.shape[2:] != (self.height, self.width):
            video = F.interpolate(
                video, size=(self.height, self.width), mode="bilinear", antialias=True
            ).clamp(-1.0, 1.0)  # (T, 3, H, W)
        return {"video": rearrange(video, "t c h w -> c t h w"), "caption": caption}


def read_metadata(folder: Path) -> list[tuple[str, str]]:
    """(file, caption) pairs from `metadata.jsonl` or `metadata.csv` in `folder`."""
    jsonl, csv_path = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.is_file():
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    elif csv_path.is_file():
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(
            f"no metadata.jsonl or metadata.csv in {folder}: write one line per video with "
            '{"file": "clip.mp4", "caption": "..."} (vidmoe.world.shapes.write_dataset does)'
        )
    for i, row in enumerate(rows):
        if "file" not in row or "caption" not in row:
            raise ValueError(f"metadata row {i} in {folder} needs 'file' and 'caption'; got {row}")
    return [(row["file"], row["caption"]) for row in rows]


def collate_videos(items: list[dict | None]) -> dict | None:
    """Stack the clips of a batch, dropping the skipped (None) ones; None if none is left."""
    items = [it for it in items if it is not None]
    if not items:
        return None
    return {
        "video": torch.stack([it["video"] for it in items]),  # (B, 3, T, H, W)
        "caption": [it["caption"] for it in items],
    }


@torch.no_grad()
def build_latent_cache(
    clips: Iterable[dict | None],
    vae,
    text_encoder,
    out_dir: str | Path,
    *,
    text_len: int,
    shard_size: int = 512,
    batch_size: int = 8,
    progress: bool = False,
) -> Path:
    """Encode clips ({"video": (3, T, H, W) in [-1, 1], "caption"}; None skipped) into a cache.

    Writes `shard_XXXXX.safetensors` (latents (N, Z, F, H, W), text (N, S, D) zero-padded to
    `text_len`, text_lengths (N,)), the empty prompt's embedding, and `index.json`.
    Returns the index path.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from vidmoe.models.text_encoder import pad_text_embeddings

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, captions, pending = [], [], {"latents": [], "text": [], "text_lengths": []}
    skipped = 0

    def flush() -> None:
        if not pending["latents"]:
            return
        name = f"shard_{len(shards):05d}.safetensors"
        save_file({k: torch.cat(v).contiguous() for k, v in pending.items()}, str(out_dir / name))
        shards.append({"file": name, "num_clips": sum(t.shape[0] for t in pending["latents"])})
        for v in pending.values():
            v.clear()

    def encode(batch: list[dict]) -> None:
        video = torch.stack([b["video"] for b in batch])  # (B, 3, T, H, W)
        latents = vae.encode(video.to(next(vae.parameters()).dtype)).float()  # (B, Z, F, H, W)
        text, lengths = pad_text_embeddings(
            text_encoder.encode([b["caption"] for b in batch]), text_len
        )  # (B, S, D), (B,)
        pending["latents"].append(latents.cpu())
        pending["text"].append(text.float().cpu())
        pending["text_lengths"].append(lengths)
        captions.extend(b["caption"] for b in batch)
        if sum(t.shape[0] for t in pending["latents"]) >= shard_size:
            flush()

    batch: list[dict] = []
    for clip in tqdm(clips, desc="cache", unit="clip", disable=not progress):
        if clip is None:
            skipped += 1
            continue
        batch.append(clip)
        if len(batch) == batch_size:
            encode(batch)
            batch = []
    if batch:
        encode(batch)
    flush()
    if not shards:
        raise ValueError("no clip could be encoded: the cache would be empty")
    empty = text_encoder.encode([""])[0].float().cpu()  # (S_0, D)
    save_file({"text": empty.contiguous()}, str(out_dir / EMPTY_PROMPT_FILE))
    index = {"shards": shards, "captions": captions, "text_len": text_len, "skipped": skipped}
    path = out_dir / CACHE_INDEX
    path.write_text(json.dumps(index, indent=1))
    return path


class LatentCache(torch.utils.data.Dataset):
    """A latent cache loaded into memory: item i is {"latent", "text", "text_length"}."""

    def __init__(self, folder: str | Path):
        from safetensors.torch import load_file

        self.folder = Path(folder)
        index_path = self.folder / CACHE_INDEX
        if not index_path.is_file():
            raise ValueError(
                f"{self.folder} is not a latent cache (no {CACHE_INDEX}): build one with "
                "vidmoe.training.data.build_latent_cache"
            )
        self.index = json.loads(index_path.read_text())
        parts = [load_file(str(self.folder / s["file"])) for s in self.index["shards"]]
        self.latents = torch.cat([p["latents"] for p in parts])  # (N, Z, F, H, W)
        self.text = torch.cat([p["text"] for p in parts])  # (N, S, D)
        self.text_lengths = torch.cat([p["text_lengths"] for p in parts])  # (N,)
        self.captions: list[str] = self.index["captions"]
        self.text_len: int = self.index["text_len"]
        empty = load_file(str(self.folder / EMPTY_PROMPT_FILE))["text"]  # (S_0, D)
        self.empty_text = F.pad(empty, (0, 0, 0, self.text_len - empty.shape[0]))  # (S, D)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {
            "latent": self.latents[index],
            "text": self.text[index],
            "text_length": self.text_lengths[index],
        }

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Latents (B, Z, F, H, W) and text (B, S, D) of the clips at `indices` (B,)."""
        return self.latents[indices], self.text[indices]


class EpochSampler:
    """Seeded reshuffling batches over N items; its position (epoch, offset) is the data state."""

    def __init__(self, num_items: int, batch_size: int, seed: int):
        if batch_size > num_items:
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({num_items})")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.epoch, self.offset = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_items, generator=g)  # (N,)

    @property
    def batches_per_epoch(self) -> int:
        return math.floor(self.num_items / self.batch_size)

    def next(self) -> Tensor:
        """Indices (batch_size,) of the next batch; a partial last batch starts a new epoch."""
        if self.offset + self.batch_size > self.num_items:
            self.epoch, self.offset = self.epoch + 1, 0
            self._order = self._permutation()
        out = self._order[self.offset : self.offset + self.batch_size]
        self.offset += self.batch_size
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation()
