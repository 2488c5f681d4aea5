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
import re
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
        key = "caption" if isinstance(caption, str) else "captions"
        return {"video": rearrange(video, "t c h w -> c t h w"), key: caption}


def read_metadata(folder: Path) -> list[tuple[str, str | list[str]]]:
    """(file, caption) pairs from `metadata.jsonl` or `metadata.csv` in `folder`; a jsonl row
    may give "captions" (a list of phrasings, the same count on every row) instead."""
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
    out = []
    for i, row in enumerate(rows):
        caption = row.get("caption", row.get("captions"))
        several = isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption)
        if "file" not in row or not (isinstance(caption, str) or several):
            raise ValueError(
                f"metadata row {i} in {folder} needs 'file' and 'caption' (a string) or "
                f"'captions' (a non-empty list of strings); got {row}"
            )
        out.append((row["file"], caption))
    return out


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

    A clip may give "captions" (K phrasings, the same K for every clip) instead of "caption":
    training then draws one of them per sample (caption augmentation). Writes
    `shard_XXXXX.safetensors` (latents (N, Z, F, H, W), text (N, S, D) zero-padded to
    `text_len`, or (N, K, S, D) for K > 1, text_lengths (N,) or (N, K)), the empty prompt's
    embedding, and `index.json`. Returns the index path.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

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
        texts = [_clip_captions(b) for b in batch]
        _check_caption_counts(texts + captions[:1])
        video = torch.stack([b["video"] for b in batch])  # (B, 3, T, H, W)
        p = next(vae.parameters())  # the VAE's device and dtype (a CUDA VAE encodes there)
        latents = vae.encode(video.to(p.device, p.dtype)).float()  # (B, Z, F, H, W)
        text, lengths = encode_captions(text_encoder, texts, text_len)  # (B, [K,] S, D)
        pending["latents"].append(latents.cpu())
        pending["text"].append(text)
        pending["text_lengths"].append(lengths)
        captions.extend(texts)
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
    index = {"shards": shards, "text_len": text_len, "skipped": skipped}
    return _write_index(out_dir, index, captions, text_encoder)


def _check_caption_counts(texts: list[list[str]]) -> None:
    counts = {len(t) for t in texts}
    if len(counts) > 1 or 0 in counts:
        raise ValueError(
            "every clip of a cache needs the same number of captions (at least one); got "
            f"{sorted(counts)}"
        )


def _write_index(out_dir: Path, index: dict, captions: list[list[str]], text_encoder) -> Path:
    """The empty prompt's embedding and `index.json` (captions: one string per clip when K = 1,
    else a list per clip); returns the index path."""
    from safetensors.torch import save_file

    empty = text_encoder.encode([""])[0].float().cpu()  # (S_0, D)
    save_file({"text": empty.contiguous()}, str(out_dir / EMPTY_PROMPT_FILE))
    flat = [c[0] for c in captions] if len(captions[0]) == 1 else [list(c) for c in captions]
    path = out_dir / CACHE_INDEX
    path.write_text(json.dumps({**index, "captions": flat}, indent=1))
    return path


def _clip_captions(clip: dict) -> list[str]:
    texts = clip.get("captions", [clip["caption"]] if "caption" in clip else None)
    if not texts or isinstance(texts, str):
        raise ValueError('a clip needs "caption" (a string) or "captions" (a non-empty list)')
    return list(texts)


def encode_captions(text_encoder, texts: list[list[str]], text_len: int) -> tuple[Tensor, Tensor]:
    """Embed K captions per clip: text (B, S, D) and lengths (B,) for K = 1, else (B, K, S, D)
    and (B, K); float32 on the CPU."""
    from vidmoe.models.text_encoder import pad_text_embeddings

    k = len(texts[0])
    flat = [t for clip in texts for t in clip]
    text, lengths = pad_text_embeddings(text_encoder.encode(flat), text_len)  # (B*K, S, D), (B*K,)
    text, lengths = text.float().cpu(), lengths.cpu()
    if k == 1:
        return text, lengths
    return rearrange(text, "(b k) s d -> b k s d", k=k), rearrange(lengths, "(b k) -> b k", k=k)


@torch.no_grad()
def recaption_cache(
    cache_dir: str | Path,
    out_dir: str | Path,
    captions: list[list[str]],
    text_encoder,
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> Path:
    """Copy a cache with new captions (K per clip, in the cache's clip order): the latents stay,
    the text is encoded afresh. Equal to building the cache with those captions."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    src, out_dir = Path(cache_dir), Path(out_dir)
    if not (src / CACHE_INDEX).is_file():
        raise ValueError(f"{src} is not a latent cache (no {CACHE_INDEX})")
    if out_dir.resolve() == src.resolve():
        raise ValueError(f"recaption_cache writes a new cache; out_dir must differ from {src}")
    index = json.loads((src / CACHE_INDEX).read_text())
    total = sum(s["num_clips"] for s in index["shards"])
    if len(captions) != total:
        raise ValueError(f"{src} holds {total} clips; got captions for {len(captions)}")
    _check_caption_counts(captions)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    bar = tqdm(total=total, desc="recaption", unit="clip", disable=not progress)
    for shard in index["shards"]:
        latents = load_file(str(src / shard["file"]))["latents"]  # (N, Z, F, H, W)
        texts, lengths = [], []
        for i in range(0, latents.shape[0], batch_size):
            chunk = captions[start + i : start + min(i + batch_size, latents.shape[0])]
            t, n = encode_captions(text_encoder, chunk, index["text_len"])
            texts.append(t)
            lengths.append(n)
            bar.update(len(chunk))
        tensors = {"latents": latents, "text": torch.cat(texts), "text_lengths": torch.cat(lengths)}
        save_file(tensors, str(out_dir / shard["file"]))
        start += latents.shape[0]
    bar.close()
    return _write_index(out_dir, index, captions, text_encoder)


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
        text = torch.cat([p["text"] for p in parts])  # (N, S, D) or (N, K, S, D)
        lengths = torch.cat([p["text_lengths"] for p in parts])  # (N,) or (N, K)
        if text.ndim == 3:
            text, lengths = text[:, None], lengths[:, None]
        self.text_variants, self.text_length_variants = text, lengths  # (N, K, S, D), (N, K)
        captions = self.index["captions"]  # one string per clip, or a list of K per clip
        self.caption_variants: list[list[str]] = [
            [c] if isinstance(c, str) else c for c in captions
        ]
        self.captions = [c[0] for c in self.caption_variants]  # the first phrasing of each clip
        self.text_len: int = self.index["text_len"]
        empty = load_file(str(self.folder / EMPTY_PROMPT_FILE))["text"]  # (S_0, D)
        self.empty_text = F.pad(empty, (0, 0, 0, self.text_len - empty.shape[0]))  # (S, D)

    @property
    def captions_per_clip(self) -> int:
        return self.text_variants.shape[1]

    @property
    def text(self) -> Tensor:
        """Text (N, S, D) of each clip's first caption."""
        return self.text_variants[:, 0]

    @property
    def text_lengths(self) -> Tensor:
        return self.text_length_variants[:, 0]  # (N,)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {
            "latent": self.latents[index],
            "text": self.text[index],
            "text_length": self.text_lengths[index],
        }

    def batch(
        self, indices: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Latents (B, Z, F, H, W) and text (B, S, D) of the clips at `indices` (B,).

        With several captions per clip and a generator, each sample takes one drawn from it
        (without one, the first); with one caption per clip nothing is drawn.
        """
        if self.captions_per_clip == 1 or generator is None:
            return self.latents[indices], self.text[indices]
        variant = torch.randint(self.captions_per_clip, indices.shape, generator=generator)  # (B,)
        return self.latents[indices], self.text_variants[indices, variant]


def oversampled_items(captions: list[str], oversample: dict[str, int]) -> Tensor:
    """Dataset indices (M,) with clip i listed N times when its caption has a word that
    `oversample` maps to N (the largest such N; whole words, case-insensitive), else once.

    A named word that no caption has is an error (a misspelt word would silently do nothing).
    """
    wanted = {w.strip().lower(): int(n) for w, n in oversample.items()}
    words = [set(re.findall(r"[a-z]+", c.lower())) for c in captions]
    unused = sorted(w for w in wanted if not any(w in ws for ws in words))
    if unused:
        raise ValueError(
            f"oversample names {unused}, which no caption of the cache has "
            f"(first caption: {captions[0]!r})"
        )
    times = [max([wanted[w] for w in ws if w in wanted], default=1) for ws in words]
    return torch.repeat_interleave(torch.arange(len(captions)), torch.tensor(times))  # (M,)


class EpochSampler:
    """Seeded reshuffling batches over N items; its position (epoch, offset) is the data state.

    `items` (M,) lists the dataset indices one epoch covers (an index listed twice is drawn
    twice per epoch, see `oversampled_items`); None: each of the N once.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, items: Tensor | None = None):
        if items is not None and (
            items.ndim != 1
            or items.dtype.is_floating_point
            or (len(items) and not (0 <= int(items.min()) and int(items.max()) < num_items))
        ):
            raise ValueError(
                f"items must be a 1-D integer tensor of dataset indices in 0..{num_items - 1}; got "
                f"{items.dtype} of shape {tuple(items.shape)}"
                + (f", values {int(items.min())}..{int(items.max())}" if items.numel() else "")
            )
        self.items = torch.arange(num_items) if items is None else items  # (M,)
        if batch_size > len(self.items):
            raise ValueError(
                f"batch_size {batch_size} is larger than the dataset ({len(self.items)})"
            )
        self.num_items, self.batch_size, self.seed = len(self.items), batch_size, seed
        self.epoch, self.offset = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return self.items[torch.randperm(self.num_items, generator=g)]  # (M,)

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
