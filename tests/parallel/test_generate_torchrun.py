"""`torchrun -m vidmoe generate --ulysses 2` end to end: two real processes, rank 0 alone writes
the mp4 and its JSON (which records the layout), and the video is the single-process one; the
flags without torchrun are one clear line."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import vidmoe
from vidmoe.cli import app
from vidmoe.io.video import read_video

ARGS = ["a red circle", "-m", "tiny-t2v", "-f", "9", "-W", "64", "-H", "48", "-s", "3"]
ARGS += ["--seed", "3", "--quiet"]


def test_torchrun_ulysses_two_writes_once_the_single_process_video(tmp_path):
    src = str(Path(vidmoe.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": src}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    out = tmp_path / "par" / "clip.mp4"
    r = subprocess.run(
        [*torchrun, "--nproc-per-node", "2", "-m", "vidmoe", "generate", *ARGS]
        + ["--ulysses", "2", "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1  # rank 1 says nothing
    assert sorted(p.name for p in out.parent.iterdir()) == ["clip.mp4", "clip.mp4.json"]
    record = json.loads(out.with_name("clip.mp4.json").read_text())
    want = {"ulysses": 2, "cfg": 1, "expert_groups": 1, "replicas": 1, "world_size": 2}
    assert record["parallel"] == want

    single = tmp_path / "one.mp4"
    r1 = CliRunner().invoke(app, ["generate", *ARGS, "-o", str(single)])
    assert r1.exit_code == 0, r1.output
    assert "parallel" not in json.loads(single.with_name("one.mp4.json").read_text())
    a, b = read_video(single)[0], read_video(out)[0]
    assert a.shape == b.shape == (9, 48, 64, 3)
    # the same latents to ~1e-7 (tests/parallel/test_ulysses.py); here usually the same bytes,
    # but h264 can turn a one-level change of a pixel into tens of levels nearby
    assert np.abs(a.astype(float) - b.astype(float)).mean() < 0.1


def test_parallel_flags_without_torchrun_say_how_to_launch(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    r = CliRunner().invoke(
        app,
        ["generate", "x", "-m", "tiny-t2v", "--ulysses", "2", "--cfg-parallel"]
        + ["-o", str(tmp_path / "a.mp4")],
    )
    assert r.exit_code == 2
    assert "--ulysses 2 --cfg-parallel runs on 4 processes and this is one" in r.output
    assert "torchrun --nproc-per-node 4 -m vidmoe generate" in r.output
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "world_size, flags, message",
    [
        ("3", ["--ulysses", "3"], "has 4 heads, not divisible by 3: use --ulysses 1, 2, 4"),
        ("4", ["--ulysses", "2"], "needs 2 processes .* but the world has 4"),
    ],
)
def test_layouts_that_do_not_fit_are_refused_before_loading(
    tmp_path, monkeypatch, world_size, flags, message
):
    for k, v in {"RANK": "0", "WORLD_SIZE": world_size, "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)  # as torchrun sets them; refused before joining a group
    r = CliRunner().invoke(
        app, ["generate", "x", "-m", "tiny-t2v", *flags, "-o", str(tmp_path / "a.mp4")]
    )
    assert r.exit_code == 2
    assert re.search(message, " ".join(r.output.split()))
