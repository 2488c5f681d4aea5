"""The training loop: a tiny model overfits one batch; a run killed with SIGKILL resumes
bit-exactly; logs, plots and config files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.conftest import (
    TINY_EXPERT,
    TINY_MOE,
    HashTextEncoder,
    PoolVAE,
    fake_clips,
    tiny_run,
)
from vidmoe.training.checkpoint import load_checkpoint, rng_state, set_rng_state
from vidmoe.training.data import build_latent_cache
from vidmoe.training.loop import (
    TrainConfig,
    Trainer,
    build_experts,
    load_train_config,
    lr_factor,
    train,
)
from vidmoe.training.objective import flow_matching_loss

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    build_latent_cache(fake_clips(12), PoolVAE(), HashTextEncoder(), folder, text_len=8)
    return folder


_config = tiny_run


def test_tiny_model_overfits_one_batch():
    cfg = TrainConfig.from_dict(_config("unused", "unused", ema_decay=0.0))
    experts = build_experts(cfg)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 2, 4, 4, generator=g)
    noise = torch.randn(4, 4, 2, 4, 4, generator=g)
    context = torch.randn(4, 8, 16, generator=g)
    sigma = torch.tensor([0.2, 0.5, 0.9, 0.95])  # both experts get samples
    opt = torch.optim.AdamW([p for e in experts.values() for p in e.parameters()], lr=3e-3)
    losses = []
    for _ in range(150):
        out = flow_matching_loss(experts, TINY_MOE, x0, context, sigma, noise)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append({n: v.item() for n, v in out.per_expert.items()})
    for name in TINY_MOE.expert_names:
        assert losses[-1][name] < 0.02 * losses[0][name], (name, losses[0], losses[-1])


_RUN = """
import json, sys, time
from vidmoe.training.loop import TrainConfig, train
cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
kill_at = int(sys.argv[2])
def callback(trainer):
    if trainer.step == kill_at:
        open(sys.argv[3], "w").write("ready")
        time.sleep(600)  # the parent SIGKILLs us here, past the last checkpoint
train(cfg, callback=callback if kill_at else None)
"""


def _run(cfg: dict, kill_at: int = 0, marker: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", _RUN, json.dumps(cfg), str(kill_at), str(marker)]
    return subprocess.Popen(args, env=env, cwd=REPO)


def test_sigkill_then_resume_is_bit_exact(cache_dir, tmp_path):
    straight = _run(_config(cache_dir, tmp_path / "straight"))
    marker = tmp_path / "ready"
    killed = _run(_config(cache_dir, tmp_path / "killed"), kill_at=5, marker=marker)
    assert straight.wait(timeout=120) == 0
    deadline = time.time() + 120
    while not marker.exists():
        assert killed.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.1)
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["step"] == 3
    assert _run(_config(cache_dir, tmp_path / "killed")).wait(timeout=120) == 0

    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert a["step"] == b["step"] == 8
    for name in TINY_MOE.expert_names:
        for k, v in a["experts"][name].items():
            assert torch.equal(v, b["experts"][name][k]), (name, k)
        for k, v in a["ema"]["shadow"][name].items():
            assert torch.equal(v, b["ema"]["shadow"][name][k]), (name, "ema", k)
    assert a["data"] == b["data"]
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"])
    log_a = (tmp_path / "straight" / "log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "killed" / "log.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in log_a]
    assert strip == [
        {k: v for k, v in json.loads(line).items() if k != "seconds"} for line in log_b
    ]


def test_stop_step_trains_a_schedule_in_parts(cache_dir, tmp_path):
    """Stopping at stop_step and going on to max_steps equals one straight run of the schedule."""
    common = dict(
        max_steps=6, warmup_steps=1, lr_schedule="cosine", checkpoint_every=100, log_every=1
    )
    whole = train(TrainConfig.from_dict(_config(cache_dir, tmp_path / "whole", **common)))
    part = train(
        TrainConfig.from_dict(_config(cache_dir, tmp_path / "parts", stop_step=2, **common))
    )
    assert part.step == 2 and part.sched.get_last_lr() != whole.sched.get_last_lr()
    parts = train(TrainConfig.from_dict(_config(cache_dir, tmp_path / "parts", **common)))
    assert parts.step == whole.step == 6
    for name, expert in whole.experts.items():
        for (k, a), b in zip(
            expert.state_dict().items(), parts.experts[name].state_dict().values()
        ):
            assert torch.equal(a, b), (name, k)
    with pytest.raises(ValueError, match=r"stop_step must be in \[0, max_steps=6\].*got 7"):
        TrainConfig.from_dict(_config(cache_dir, tmp_path / "bad", stop_step=7, max_steps=6))


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile on the CPU needs a C++ compiler",
)
def test_compiled_experts_train_like_eager_ones_and_keep_checkpoint_keys(cache_dir, tmp_path):
    """`compile = true` runs the experts through torch.compile: the losses follow the eager run's
    (fp32; inductor may reorder sums, so to 1e-4), the checkpoint has the eager key names, and an
    eager config resumes it."""
    common = dict(max_steps=3, checkpoint_every=100, log_every=1)
    eager = train(TrainConfig.from_dict(_config(cache_dir, tmp_path / "eager", **common)))
    compiled = train(
        TrainConfig.from_dict(_config(cache_dir, tmp_path / "compiled", compile=True, **common))
    )
    logs = [
        [json.loads(ln)["loss"] for ln in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for run in ("eager", "compiled")
    ]
    assert len(logs[0]) == len(logs[1]) == 3
    for a, b in zip(*logs):
        assert a.keys() == b.keys()
        for name in a:
            assert abs(a[name] - b[name]) < 1e-4 * max(1.0, abs(a[name])), (name, a, b)
    state = load_checkpoint(tmp_path / "compiled" / "checkpoint.pt")
    assert {n: list(s) for n, s in state["experts"].items()} == {
        n: list(e.state_dict()) for n, e in eager.experts.items()
    }
    resumed = train(
        TrainConfig.from_dict(_config(cache_dir, tmp_path / "compiled", max_steps=4, log_every=1))
    )
    assert resumed.step == 4 and not resumed.cfg.compile
    assert compiled.step == 3


def test_schedule_start_restarts_the_learning_rate_cycle(cache_dir, tmp_path):
    """A run resumed with schedule_start = its step warms up again and runs a fresh cosine."""
    common = dict(warmup_steps=2, lr_schedule="cosine", checkpoint_every=100, log_every=1)
    first = train(TrainConfig.from_dict(_config(cache_dir, tmp_path, max_steps=4, **common)))
    lr = first.cfg.lr
    assert first.sched.get_last_lr()[0] == pytest.approx(0.1 * lr)  # the first cosine's end
    cfg = TrainConfig.from_dict(
        _config(cache_dir, tmp_path, max_steps=10, schedule_start=4, lr=lr / 2, **common)
    )
    factors = [lr_factor(cfg, s) for s in range(4, 11)]
    assert factors[:2] == [0.5, 1.0] and factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))  # cosine decay after warm-up
    resumed = Trainer(cfg)
    assert resumed.try_resume() and resumed.step == 4  # its first step runs at the new cycle's lr
    assert resumed.opt.param_groups[0]["lr"] == pytest.approx(lr / 2 * 0.5)
    second = train(cfg)
    lrs = [json.loads(ln)["lr"] for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert second.step == 10 and lrs[4:] == pytest.approx([lr / 2 * f for f in factors[1:]])
    fresh = TrainConfig.from_dict(
        _config(cache_dir, tmp_path / "fresh", max_steps=10, schedule_start=4, **common)
    )
    with pytest.raises(ValueError, match="schedule_start=4 .* is at step 0"):
        train(fresh)
    with pytest.raises(ValueError, match=r"schedule_start must be in \[0, max_steps=10\); got 10"):
        TrainConfig.from_dict(_config(cache_dir, tmp_path, max_steps=10, schedule_start=10))


def test_caption_variants_train_and_resume_exactly(tmp_path):
    """On a cache with 3 captions per clip the run draws among them (it differs from the same
    run whose variants all repeat the first caption) and still resumes exactly (the draws come
    from the saved generator)."""
    clips = fake_clips(12)
    build_latent_cache(
        [{"video": c["video"], "captions": [c["caption"], "an echo", "x"]} for c in clips],
        PoolVAE(),
        HashTextEncoder(),
        tmp_path / "cache3",
        text_len=8,
    )
    build_latent_cache(  # the same draws, but every variant is the first caption
        [{"video": c["video"], "captions": [c["caption"]] * 3} for c in clips],
        PoolVAE(),
        HashTextEncoder(),
        tmp_path / "cache1",
        text_len=8,
    )
    common = dict(max_steps=4, warmup_steps=1, checkpoint_every=100, log_every=1)
    runs = {}
    for name, cache, stop in (
        ("whole", "cache3", 0),
        ("parts", "cache3", 2),
        ("first", "cache1", 0),
    ):
        runs[name] = train(
            TrainConfig.from_dict(
                _config(tmp_path / cache, tmp_path / name, stop_step=stop, **common)
            )
        )
    runs["parts"] = train(
        TrainConfig.from_dict(_config(tmp_path / "cache3", tmp_path / "parts", **common))
    )
    for name, expert in runs["whole"].experts.items():
        whole = expert.state_dict()
        parts = runs["parts"].experts[name].state_dict()
        first = runs["first"].experts[name].state_dict()
        assert all(torch.equal(whole[k], parts[k]) for k in whole), name
        assert not all(torch.equal(whole[k], first[k]) for k in whole), name


def test_logs_plots_and_counts(cache_dir, tmp_path):
    cfg = TrainConfig.from_dict(_config(cache_dir, tmp_path, max_steps=4, checkpoint_every=2))
    trainer = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(sum(r["count"].values()) == 2 * cfg.batch_size for r in records)
    assert set(records[0]["count"]) == {"high_noise", "low_noise"}
    for png in ("loss_per_expert.png", "loss_vs_sigma.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert trainer.step == 4 and (tmp_path / "checkpoint.pt").is_file()
    assert not list(tmp_path.glob(".*.tmp*"))  # atomic writes leave no temp files


def test_oversample_draws_the_named_clips_more_often(cache_dir, tmp_path):
    cfg = TrainConfig.from_dict(_config(cache_dir, tmp_path, batch_size=6, oversample={"left": 3}))
    trainer = Trainer(cfg)
    drawn = torch.cat([trainer.sampler.next() for _ in range(4)])  # one epoch: 6 x 3 + 6 clips
    left = torch.tensor(["left" in c for c in trainer.data.captions])
    assert (left[drawn].sum().item(), (~left[drawn]).sum().item()) == (18, 6)
    with pytest.raises(ValueError, match="no caption of the cache has"):
        Trainer(TrainConfig.from_dict(_config(cache_dir, tmp_path, oversample={"up": 2})))


def test_toml_config_round_trip(cache_dir, tmp_path):
    path = tmp_path / "train.toml"
    path.write_text(
        f'cache = "{cache_dir}"\nout_dir = "{tmp_path / "run"}"\nbatch_size = 2\n'
        "use_bf16 = true\n[transformer]\n"
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in TINY_EXPERT.to_dict().items())
        + "[moe]\nboundaries = [0.9]\nguidance = [5.0, 4.0]\n"
    )
    cfg = load_train_config(path)
    assert cfg.transformer == TINY_EXPERT and cfg.moe.boundaries == (0.9,) and cfg.use_bf16
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_a_config_states_only_what_changes_from_its_base(cache_dir, tmp_path):
    """`base = "other.toml"`: the base's keys, this file's in their place; tables merged by key."""
    (tmp_path / "phases").mkdir()
    (tmp_path / "phase1.toml").write_text(
        f'cache = "{cache_dir}"\nout_dir = "{tmp_path / "run"}"\nbatch_size = 2\nlr = 1e-3\n'
        "[transformer]\n"
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in TINY_EXPERT.to_dict().items())
        + "[moe]\nboundaries = [0.9]\nguidance = [5.0, 4.0]\n"
    )
    (tmp_path / "phases" / "phase2.toml").write_text(
        'base = "../phase1.toml"\nlr_schedule = "cosine"\nmax_steps = 40\n'
        "[moe]\nguidance = [6.0, 3.0]\n"
    )
    (tmp_path / "phases" / "phase3.json").write_text(
        json.dumps({"base": "phase2.toml", "lr": 5e-4})
    )
    first = load_train_config(tmp_path / "phase1.toml")
    third = load_train_config(tmp_path / "phases" / "phase3.json")
    assert (third.lr, third.lr_schedule, third.max_steps) == (5e-4, "cosine", 40)
    assert third.moe.guidance == (6.0, 3.0) and third.moe.boundaries == first.moe.boundaries
    changed = {"lr", "lr_schedule", "max_steps", "moe"}
    assert {k: v for k, v in third.to_dict().items() if k not in changed} == {
        k: v for k, v in first.to_dict().items() if k not in changed
    }
    (tmp_path / "loop_a.toml").write_text('base = "loop_b.toml"\n')
    (tmp_path / "loop_b.toml").write_text('base = "loop_a.toml"\n')
    with pytest.raises(ValueError, match="bases form a cycle"):
        load_train_config(tmp_path / "loop_a.toml")
    (tmp_path / "orphan.toml").write_text('base = "gone.toml"\n')
    with pytest.raises(ValueError, match=r"gone.toml \(the base of .*orphan.toml\) does not exist"):
        load_train_config(tmp_path / "orphan.toml")
    (tmp_path / "broken.toml").write_text("lr = \n")
    with pytest.raises(ValueError, match="broken.toml is not valid toml"):
        load_train_config(tmp_path / "broken.toml")


class _Payload:
    def __reduce__(self):
        return (print, ("unpickling ran code",))


def test_checkpoints_load_without_running_code_and_old_rng_states_still_resume(tmp_path, capsys):
    """load_checkpoint unpickles weights-only: a pickle that would call a function is refused;
    a checkpoint from before the numpy RNG state was stored as a tensor still restores it."""
    bad = tmp_path / "bad.pt"
    torch.save({"step": 1, "x": _Payload()}, bad)
    with pytest.raises(ValueError, match="bad.pt is not a readable training checkpoint"):
        load_checkpoint(bad)
    assert "unpickling ran code" not in capsys.readouterr().out
    old = tmp_path / "old.pt"
    torch.save({"rng": {**rng_state(), "numpy": np.random.get_state()}}, old)
    expected = np.random.rand(3)
    set_rng_state(load_checkpoint(old)["rng"])
    assert np.array_equal(np.random.rand(3), expected)


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'learning_rate' in the top level"):
        TrainConfig.from_dict({**_config("c", "o"), "learning_rate": 1.0})
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig.from_dict(_config("c", "o", lr_schedule="linear"))
    for bad in ({"left": 0}, {"left": 1.5}, {"moving left": 2}):
        with pytest.raises(ValueError, match="oversample"):
            TrainConfig.from_dict(_config("c", "o", oversample=bad))
    (tmp_path / "x.yaml").write_text("")
    with pytest.raises(ValueError, match="toml or .json"):
        load_train_config(tmp_path / "x.yaml")


def test_a_head_narrower_than_a_tokens_outputs_is_warned():
    narrow = {**TINY_EXPERT.to_dict(), "dim": 8, "num_heads": 2}  # a (1, 2, 2) patch x 4 = 16
    with pytest.warns(UserWarning, match=r"width 8 is below the 16 values"):
        TrainConfig.from_dict(_config("c", "o", transformer=narrow))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig.from_dict(_config("c", "o"))  # width 32: no warning


def test_device_is_checked_and_auto_trains_where_cuda_is(cache_dir, tmp_path):
    """`device` names a CPU or CUDA device; "auto" takes CUDA when there is one and is the same
    run as "cpu" without (every draw is made on the CPU)."""
    for bad in ("tpu", "mps", "gpu0"):
        with pytest.raises(ValueError, match=r'device must be "cpu", "cuda", "cuda:N" or "auto"'):
            TrainConfig.from_dict(_config(cache_dir, tmp_path, device=bad))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device here"):
            Trainer(TrainConfig.from_dict(_config(cache_dir, tmp_path / "c", device="cuda")))
    common = dict(max_steps=3, checkpoint_every=100, log_every=1)
    cpu = train(TrainConfig.from_dict(_config(cache_dir, tmp_path / "cpu", **common)))
    auto = train(
        TrainConfig.from_dict(_config(cache_dir, tmp_path / "auto", device="auto", **common))
    )
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    logs = [
        [json.loads(ln)["loss"] for ln in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for run in ("cpu", "auto")
    ]
    for a, b in zip(*logs, strict=True):  # CUDA kernels sum in another order: to 1e-3
        for name in a:
            assert abs(a[name] - b[name]) <= 1e-3 * max(1.0, abs(a[name])), (name, a, b)
    if auto.device.type == "cpu":  # the very same run: bit-exact
        for name, expert in cpu.experts.items():
            for (k, x), y in zip(
                expert.state_dict().items(), auto.experts[name].state_dict().values()
            ):
                assert torch.equal(x, y), (name, k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_run_resumes_on_the_cpu(cache_dir, tmp_path):
    """A checkpoint written by a CUDA run resumes on the CPU (and back): tensors are read onto
    the CPU and moved to the run's device; the optimiser and EMA state follow the experts."""
    common = dict(max_steps=2, checkpoint_every=100, log_every=1)
    gpu = train(TrainConfig.from_dict(_config(cache_dir, tmp_path, device="cuda", **common)))
    assert all(p.is_cuda for e in gpu.experts.values() for p in e.parameters())
    cpu = train(
        TrainConfig.from_dict(
            _config(
                cache_dir, tmp_path, device="cpu", max_steps=4, checkpoint_every=100, log_every=1
            )
        )
    )
    assert cpu.step == 4 and not any(
        p.is_cuda for e in cpu.experts.values() for p in e.parameters()
    )
    state = cpu.opt.state_dict()["state"]
    assert state and all(not v.is_cuda for s in state.values() for v in s.values())
    again = train(
        TrainConfig.from_dict(
            _config(
                cache_dir, tmp_path, device="cuda", max_steps=5, checkpoint_every=100, log_every=1
            )
        )
    )
    assert again.step == 5 and all(v.is_cuda for s in again.ema.shadow.values() for v in s.values())


def test_trainer_holds_an_experts_of_the_trained_experts(cache_dir, tmp_path):
    """A run of every expert holds them all in one `Experts`; a run of `experts = ["low_noise"]`
    holds only that one (the router still knows both) and counts its parameters alone."""
    from vidmoe.models.moe import Experts, count_params

    both = Trainer(TrainConfig.from_dict(_config(cache_dir, tmp_path / "both")))
    low = Trainer(
        TrainConfig.from_dict(_config(cache_dir, tmp_path / "low", experts=["low_noise"]))
    )
    assert isinstance(both.experts, Experts) and isinstance(low.experts, Experts)
    assert list(both.experts) == ["high_noise", "low_noise"] and list(low.experts) == ["low_noise"]
    assert "high_noise" not in low.experts and len(low.experts) == 1
    assert low.experts.router.expert_names == ("high_noise", "low_noise")
    per_expert = {n: e.num_params() for n, e in both.experts.items()}
    assert both.param_counts().per_expert == per_expert
    assert both.param_counts().total == sum(per_expert.values())
    assert low.param_counts() == count_params({"low_noise": low.experts["low_noise"]})
    record = low.train_step()  # every sample falls in low_noise's range
    assert set(record["count"]) == {"low_noise"} and record["count"]["low_noise"] == 4
    with pytest.raises(ValueError, match="missing \\['high_noise'\\]"):
        Experts({"low_noise": low.experts["low_noise"]}, low.cfg.moe)  # a Pipeline needs both
