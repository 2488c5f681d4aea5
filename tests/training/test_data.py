"""Training data: the latent cache equals fresh encoding; a video folder skips corrupt files."""

from __future__ import annotations

import json

import pytest
import torch

from tests.training.conftest import HashTextEncoder, PoolVAE, fake_clips
from vidmoe.models.text_encoder import pad_text_embeddings
from vidmoe.training.data import (
    EpochSampler,
    LatentCache,
    VideoFolderDataset,
    build_latent_cache,
    collate_videos,
    oversampled_items,
    recaption_cache,
)


def test_cache_equals_fresh_encoding(tmp_path):
    clips = fake_clips(7)
    vae, text = PoolVAE(), HashTextEncoder()
    build_latent_cache(clips + [None], vae, text, tmp_path, text_len=8, shard_size=3, batch_size=2)
    cache = LatentCache(tmp_path)
    assert len(cache) == 7 and len(cache.index["shards"]) >= 2 and cache.index["skipped"] == 1
    fresh = vae.encode(torch.stack([c["video"] for c in clips]))
    emb, lengths = pad_text_embeddings(text.encode([c["caption"] for c in clips]), 8)
    # batching changes float rounding only
    torch.testing.assert_close(cache.latents, fresh, rtol=1e-5, atol=1e-6)
    assert torch.equal(cache.text, emb) and torch.equal(cache.text_lengths, lengths)
    assert cache.captions == [c["caption"] for c in clips]
    empty = text.encode([""])[0]
    assert (
        torch.equal(cache.empty_text[: len(empty)], empty)
        and not cache.empty_text[len(empty) :].any()
    )


def _with_variants(clips: list[dict], k: int) -> list[dict]:
    return [
        {"video": c["video"], "captions": [f"{c['caption']} v{j}" for j in range(k)]} for c in clips
    ]


def test_cache_with_caption_variants_draws_one_per_sample(tmp_path):
    clips = _with_variants(fake_clips(5), 3)
    vae, text = PoolVAE(), HashTextEncoder()
    build_latent_cache(clips, vae, text, tmp_path, text_len=8, shard_size=2, batch_size=2)
    cache = LatentCache(tmp_path)
    assert cache.captions_per_clip == 3 and cache.caption_variants == [c["captions"] for c in clips]
    assert cache.captions == [c["captions"][0] for c in clips]
    for i, clip in enumerate(clips):
        emb, _ = pad_text_embeddings(text.encode(clip["captions"]), 8)  # (3, S, D)
        assert torch.equal(cache.text_variants[i], emb)
    indices = torch.tensor([0, 4, 2, 2])
    assert torch.equal(cache.batch(indices)[1], cache.text[indices])  # no generator: the first
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        latents, batch_text = cache.batch(indices, g)
        assert torch.equal(latents, cache.latents[indices])
        for row, i in zip(batch_text, indices.tolist()):
            (match,) = [v for v in range(3) if torch.equal(row, cache.text_variants[i, v])]
            seen.add(match)
    assert seen == {0, 1, 2}


def test_single_caption_cache_draws_nothing_from_the_generator(tmp_path):
    build_latent_cache(fake_clips(3), PoolVAE(), HashTextEncoder(), tmp_path, text_len=8)
    cache = LatentCache(tmp_path)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.equal(cache.batch(torch.tensor([2, 0]), g)[1], cache.text[[2, 0]])
    assert torch.equal(g.get_state(), state)  # runs on one-caption caches stay bit-identical


def test_recaption_equals_building_with_those_captions(tmp_path):
    clips = fake_clips(5)
    vae, text = PoolVAE(), HashTextEncoder()
    build_latent_cache(clips, vae, text, tmp_path / "a", text_len=8, shard_size=2, batch_size=2)
    variants = [c["captions"] for c in _with_variants(clips, 2)]
    recaption_cache(tmp_path / "a", tmp_path / "b", variants, text, batch_size=3)
    build_latent_cache(
        _with_variants(clips, 2), vae, text, tmp_path / "c", text_len=8, shard_size=2, batch_size=2
    )
    b, c = LatentCache(tmp_path / "b"), LatentCache(tmp_path / "c")
    assert torch.equal(b.latents, LatentCache(tmp_path / "a").latents)
    assert torch.equal(b.text_variants, c.text_variants)
    assert torch.equal(b.text_length_variants, c.text_length_variants)
    assert b.caption_variants == c.caption_variants == variants
    with pytest.raises(ValueError, match="out_dir must differ"):
        recaption_cache(tmp_path / "a", tmp_path / "a", variants, text)
    with pytest.raises(ValueError, match="not a latent cache"):
        recaption_cache(tmp_path / "nothing", tmp_path / "d", variants, text)
    with pytest.raises(ValueError, match="holds 5 clips; got captions for 4"):
        recaption_cache(tmp_path / "a", tmp_path / "d", variants[:4], text)
    with pytest.raises(ValueError, match="same number of captions"):
        build_latent_cache(
            [{"video": clips[0]["video"], "captions": ["x", "y"]}, clips[1]],
            vae,
            text,
            tmp_path / "e",
            text_len=8,
        )


def _write_folder(tmp_path, n=3):
    from vidmoe.world.shapes import write_dataset

    write_dataset(tmp_path, n, width=32, height=32, num_frames=9)
    return [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]


def test_video_folder_reads_resizes_and_cuts(tmp_path):
    rows = _write_folder(tmp_path, 2)
    ds = VideoFolderDataset(tmp_path, num_frames=5, width=16, height=24)
    item = ds[0]
    assert item["video"].shape == (3, 5, 24, 16) and item["caption"] == rows[0]["caption"]
    assert item["video"].min() >= -1 and item["video"].max() <= 1
    full = VideoFolderDataset(tmp_path, num_frames=9, width=32, height=32)[1]["video"]
    from vidmoe.world.shapes import ShapesWorld

    truth = ShapesWorld(32, 32, 9, seed=0).sample(1).video
    assert (full - truth).abs().mean() < 0.05  # lossy mp4, same clip


def test_corrupt_and_short_files_are_reported_and_skipped(tmp_path, caplog):
    _write_folder(tmp_path, 3)
    (tmp_path / "000001.mp4").write_bytes(b"not a video at all")
    ds = VideoFolderDataset(tmp_path, num_frames=9, width=32, height=32)
    with caplog.at_level("WARNING"):
        items = [ds[i] for i in range(len(ds))]
    assert items[1] is None and items[0] is not None and items[2] is not None
    assert [name for name, _ in ds.skipped] == ["000001.mp4"]
    assert "000001.mp4" in caplog.text
    batch = collate_videos(items)
    assert batch["video"].shape[0] == 2
    long = VideoFolderDataset(tmp_path, num_frames=33, width=32, height=32)
    assert long[0] is None and "frames" in long.skipped[0][1]


def test_csv_metadata(tmp_path):
    rows = _write_folder(tmp_path, 1)
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text(f'file,caption\n000000.mp4,"{rows[0]["caption"]}"\n')
    ds = VideoFolderDataset(tmp_path, num_frames=9, width=32, height=32)
    assert ds[0]["caption"] == rows[0]["caption"]


def test_jsonl_rows_may_give_several_captions(tmp_path):
    rows = _write_folder(tmp_path, 2)
    lines = [{"file": r["file"], "captions": [r["caption"], "another phrasing"]} for r in rows]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    ds = VideoFolderDataset(tmp_path, num_frames=9, width=32, height=32)
    assert ds[1]["captions"] == lines[1]["captions"] and "caption" not in ds[1]
    build_latent_cache([ds[0], ds[1]], PoolVAE(), HashTextEncoder(), tmp_path / "cache", text_len=8)
    assert LatentCache(tmp_path / "cache").caption_variants == [r["captions"] for r in lines]
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file": "a.mp4", "captions": []}) + "\n")
    with pytest.raises(ValueError, match="row 0 .* non-empty list of strings"):
        VideoFolderDataset(tmp_path, num_frames=9, width=32, height=32)


def test_epoch_sampler_resumes_its_position():
    a = EpochSampler(10, 3, seed=5)
    seen = [a.next() for _ in range(4)]
    assert sorted(torch.cat(seen[:3]).tolist()) == sorted(set(torch.cat(seen[:3]).tolist()))
    b = EpochSampler(10, 3, seed=5)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(a.next(), b.next()) for _ in range(7))


def test_oversampled_items_repeat_named_clips_and_reject_unknown_words():
    captions = ["a red Star moving left", "a blue circle, rising", "star or square", "starry sky"]
    items = oversampled_items(captions, {"star": 3, "square": 2})
    assert items.tolist() == [0, 0, 0, 1, 2, 2, 2, 3]  # whole words; the largest count wins
    one_epoch = EpochSampler(4, 2, seed=0, items=items)
    drawn = torch.cat([one_epoch.next() for _ in range(4)])
    assert torch.bincount(drawn, minlength=4).tolist() == [3, 1, 3, 1]
    with pytest.raises(ValueError, match=r"\['strar'\], which no caption of the cache has"):
        oversampled_items(captions, {"strar": 2})
    for bad in (torch.tensor([0, 4]), torch.tensor([-1, 1]), torch.tensor([0.0, 1.0]), items[None]):
        with pytest.raises(ValueError, match=r"1-D integer tensor of dataset indices in 0\.\.3"):
            EpochSampler(4, 2, seed=0, items=bad)
