"""Batch generation from a prompts file: parsing, bad lines, resuming, the CLI's exit status."""

import hashlib
import json
import os
import re

import pytest
from typer.testing import CliRunner

from vidmoe.batch import generate_batch, read_jobs
from vidmoe.cli import app
from vidmoe.io.video import publish_video, record_path
from vidmoe.loading import build_random_pipeline
from vidmoe.sampling.settings import GenerateSettings

SMALL = GenerateSettings(width=32, height=32, num_frames=5, num_steps=3)


@pytest.fixture(scope="module")
def pipe():
    return build_random_pipeline("tiny-t2v")


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_text_file_skips_blanks_and_comments_and_names_outputs(tmp_path):
    path = _write(tmp_path, "p.txt", ["# a batch", "A red circle!", "", "  blue square  "])
    jobs = read_jobs(path, SMALL)
    assert [(j.index, j.line, j.name) for j in jobs] == [
        (0, 2, "0000-a-red-circle"),
        (1, 4, "0001-blue-square"),
    ]
    assert jobs[1].settings == GenerateSettings(
        prompt="blue square", width=32, height=32, num_frames=5, num_steps=3
    )


def test_jsonl_lines_override_the_defaults_and_bad_lines_say_why(tmp_path):
    lines = [
        '{"prompt": "a", "seed": 5, "guidance": {"high_noise": 2.0}, "name": "first.mp4"}',
        "# skipped",
        "{not json",
        '{"prompt": "b", "colour": "red"}',
        '{"prompt": "c", "name": "first"}',
        '{"prompt": "d", "name": "../escape"}',
        '["prompt"]',
        '{"seed": 1}',
    ]
    jobs = read_jobs(_write(tmp_path, "p.jsonl", lines), SMALL)
    assert jobs[0].name == "first"
    assert (jobs[0].settings.seed, jobs[0].settings.width) == (5, 32)
    assert jobs[0].settings.guidance == {"high_noise": 2.0}
    errors = {j.line: j.error for j in jobs if j.error}
    assert "not valid JSON" in errors[3]
    assert "unknown key 'colour'" in errors[4] and "accepted: name, prompt" in errors[4]
    assert "already used by line 1" in errors[5]
    assert "file stem" in errors[6]
    assert "must be an object" in errors[7]
    assert "needs a string 'prompt'" in errors[8]
    with pytest.raises(ValueError, match="has no prompts"):
        read_jobs(_write(tmp_path, "empty.txt", ["# nothing", ""]), SMALL)


def test_a_bad_line_is_reported_the_others_run_and_a_restart_skips_them(pipe, tmp_path):
    lines = [
        '{"prompt": "a red circle", "seed": 1}',
        '{"prompt": "too many frames", "num_frames": 8}',
        '{"prompt": "a blue star", "seed": 2, "sampler": "euler"}',
    ]
    prompts = _write(tmp_path, "p.jsonl", lines)
    out = tmp_path / "out"
    logged = []
    report = generate_batch(pipe, read_jobs(prompts, SMALL), out, log=logged.append)
    assert [o.status for o in report.outcomes] == ["done", "failed", "done"]
    assert logged == [f"line 2: {report.outcomes[1].error}"] and not report.ok
    assert "num_frames must be 4k+1" in logged[0]
    record = json.loads((out / "0002-a-blue-star.mp4.json").read_text())
    assert record["settings"]["sampler"] == "euler" and record["batch"]["line"] == 3
    statuses = [json.loads(s)["status"] for s in (out / "batch.jsonl").read_text().splitlines()]
    assert statuses == ["done", "failed", "done"]

    first, third = out / "0000-a-red-circle.mp4", out / "0002-a-blue-star.mp4"
    mtimes = {p: p.stat().st_mtime_ns for p in (first, third, record_path(first))}
    # a half-written temp beside a video is never taken as done; a lost record redoes its video
    (out / ".0002-a-blue-star.mp4.1234abcd.tmp.mp4").write_bytes(b"half")
    record_path(third).unlink()
    again = generate_batch(pipe, read_jobs(prompts, SMALL), out)
    assert [o.status for o in again.outcomes] == ["skipped", "failed", "done"]
    assert first.stat().st_mtime_ns == mtimes[first]
    assert record_path(first).stat().st_mtime_ns == mtimes[record_path(first)]
    assert json.loads(record_path(third).read_text())["settings"]["seed"] == 2

    # a changed setting on a line makes its old output stale: it is generated again
    lines[0] = '{"prompt": "a red circle", "seed": 9}'
    changed = generate_batch(pipe, read_jobs(_write(tmp_path, "p.jsonl", lines), SMALL), out)
    assert [o.status for o in changed.outcomes] == ["done", "failed", "skipped"]
    assert json.loads(record_path(first).read_text())["settings"]["seed"] == 9


def test_cli_batch_exit_status_and_summary(tmp_path):
    prompts = _write(tmp_path, "p.txt", ["a red circle", "a blue star"])
    args = ["generate", "-m", "tiny-t2v", "--prompts", str(prompts), "-W", "32", "-H", "32"]
    args += ["-f", "5", "-s", "2", "-q", "-o", str(tmp_path / "out")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "batch: 2 done, 0 skipped, 0 failed" in r.output
    assert sorted(os.listdir(tmp_path / "out")) == [
        "0000-a-red-circle.mp4",
        "0000-a-red-circle.mp4.json",
        "0001-a-blue-star.mp4",
        "0001-a-blue-star.mp4.json",
        "batch.jsonl",
    ]
    r = CliRunner().invoke(app, [*args, "--seed", "-1"])
    assert r.exit_code == 1 and "batch: 0 done, 0 skipped, 2 failed" in r.output
    assert "line 1: seed must be an integer >= 0" in r.output
    r = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "v.mp4")])
    assert r.exit_code == 2 and "-o names a folder" in r.output
    r = CliRunner().invoke(app, [*args, "--expert-groups", "2"])  # one process, no torchrun
    assert r.exit_code == 2 and "needs 2 processes" in r.output
    r = CliRunner().invoke(app, ["generate", "x", "-m", "tiny-t2v", "--expert-groups", "2"])
    assert r.exit_code == 2 and "give --prompts FILE" in r.output


def test_batch_outputs_are_the_single_video_outputs(pipe, tmp_path):
    """A batch line publishes the very video a single generate() with its settings gives."""
    prompts = _write(tmp_path, "p.txt", ["a green triangle"])
    generate_batch(pipe, read_jobs(prompts, SMALL), tmp_path / "batch")
    record = json.loads((tmp_path / "batch" / "0000-a-green-triangle.mp4.json").read_text())
    single = pipe.generate("a green triangle", width=32, height=32, num_frames=5, num_steps=3)
    publish_video(single.frames, {}, tmp_path / "single.mp4", fps=pipe.config.fps)
    assert record["settings"] == json.loads(json.dumps(single.settings.to_dict()))
    assert (
        record["video"]["sha256"]
        == hashlib.sha256((tmp_path / "single.mp4").read_bytes()).hexdigest()
    )


@pytest.mark.parametrize(
    "world_size, flags, message",
    [
        (
            None,
            ["--ulysses", "2"],
            "--ulysses 2 with --prompts needs 2 processes per replica and "
            "this is one: launch with `torchrun --nproc-per-node 2",
        ),
        (
            "6",
            ["--expert-groups", "2", "--ulysses", "2"],
            "takes 4 processes .* world has 6, not a multiple: launch a multiple of 4",
        ),
        ("3", ["--ulysses", "3"], "has 4 heads, not divisible by 3: use --ulysses 1, 2, 4"),
        ("2", ["--shard-experts"], "here that is one rank: add --ulysses 2 or --cfg-parallel"),
        ("4", ["--expert-groups", "2", "--shard-experts"], "here that is one rank"),
        ("2", ["--ulysses", "2", "--shard-text-encoder"], "add --shard-experts"),
    ],
)
def test_batch_layouts_that_do_not_fit_are_refused_before_loading(
    tmp_path, monkeypatch, world_size, flags, message
):
    """One line each, before the process group is joined or anything is loaded."""
    prompts = _write(tmp_path, "p.txt", ["a red circle"])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    if world_size is not None:  # as torchrun sets them; refused before joining a group
        for k, v in {"RANK": "0", "WORLD_SIZE": world_size, "LOCAL_RANK": "0"}.items():
            monkeypatch.setenv(k, v)
    args = ["generate", "-m", "tiny-t2v", "--prompts", str(prompts), "-o", str(tmp_path / "out")]
    r = CliRunner().invoke(app, [*args, *flags])
    assert r.exit_code == 2, r.output
    assert re.search(message, " ".join(r.output.split())), r.output
    assert not (tmp_path / "out").exists()
