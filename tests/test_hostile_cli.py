"""Hostile but realistic use of the CLI (issue 24): every refusal is exit 2 and one line naming
the problem, before any work; the mp4 and its JSON are published as one unit; same seed, same bytes.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import vidmoe.io.video as video_io
from vidmoe.cli import app
from vidmoe.io.video import publish_video, read_video, record_path, video_matches_record

runner = CliRunner()
SRC = Path(__file__).resolve().parents[1] / "src"
DEMO = SRC / "vidmoe" / "assets" / "demo"
TINY = ["-m", "tiny-t2v", "-f", "5", "-W", "64", "-H", "48", "-s", "2", "--quiet"]


def refused(args: list[str], *needles: str) -> str:
    """Run the CLI; assert exit 2 and one line `error: ...` containing every needle."""
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- output paths, checked before any work -------------------------------------------------


def test_output_folder_is_refused(tmp_path):
    refused(["generate", "x", *TINY, "-o", str(tmp_path)], str(tmp_path), "is a folder")


@pytest.mark.parametrize("name", ["clip.gif", "clip.png", "clip"])
def test_output_other_than_mp4_is_refused(tmp_path, name):
    refused(["generate", "x", *TINY, "-o", str(tmp_path / name)], ".mp4", name)
    assert list(tmp_path.iterdir()) == []


def test_output_in_proc_is_refused():
    refused(["generate", "x", *TINY, "-o", "/proc/clip.mp4"], "cannot write", "/proc")


def test_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("")
    refused(["generate", "x", *TINY, "-o", str(tmp_path / "afile" / "c.mp4")], "cannot write")


def test_output_checked_before_the_model_loads(tmp_path):
    # The model does not exist: the path error comes first, so no work is done on a doomed run.
    refused(
        ["generate", "x", "-m", str(tmp_path / "nothing"), "-o", str(tmp_path / "a.gif")], ".mp4"
    )


# --- environment and input errors ----------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path):
    refused(
        ["generate", "x", *TINY, "--device", "cuda", "-o", str(tmp_path / "a.mp4")], "--device cuda"
    )


def test_device_nonsense(tmp_path):
    refused(["generate", "x", *TINY, "--device", "banana", "-o", str(tmp_path / "a.mp4")], "banana")


def _bomb_png(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("kind", ["bomb", "not an image"])
def test_image_that_cannot_be_opened_safely(tmp_path, kind):
    if kind == "bomb":
        image, needles = (
            _bomb_png(tmp_path / "bomb.png", 100_000, 100_000),
            ("bomb.png", "too large"),
        )
    else:
        image, needles = tmp_path / "x.png", ("x.png",)
        image.write_bytes(b"not an image")
    args = [
        "generate",
        "x",
        *TINY,
        "-m",
        "tiny-ti2v",
        "-i",
        str(image),
        "-o",
        str(tmp_path / "a.mp4"),
    ]
    refused(args, *needles)


def _demo_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    (folder / "experts").mkdir(parents=True)
    shutil.copy(DEMO / "vidmoe.json", folder)
    for file in [
        "vae.safetensors",
        "experts/high_noise.safetensors",
        "experts/low_noise.safetensors",
    ]:
        (folder / file).symlink_to(DEMO / file)
    return folder


def test_truncated_model_file(tmp_path):
    folder = _demo_copy(tmp_path)
    (folder / "vae.safetensors").unlink()
    (folder / "vae.safetensors").write_bytes((DEMO / "vae.safetensors").read_bytes()[:3000])
    refused(
        ["generate", "x", "-m", str(folder), "-o", str(tmp_path / "a.mp4"), "-q"],
        "vae.safetensors",
        "truncated",
    )


def test_model_whose_config_cannot_be_built(tmp_path):
    folder = _demo_copy(tmp_path)
    config = json.loads((folder / "vidmoe.json").read_text())
    config["transformer"]["dim"] = 10**9
    (folder / "vidmoe.json").write_text(json.dumps(config))
    refused(
        ["generate", "x", "-m", str(folder), "-s", "1", "-o", str(tmp_path / "a.mp4"), "-q"],
        "TransformerConfig.dim",
        "1000000000",
    )


def test_model_that_does_not_exist(tmp_path):
    refused(["generate", "x", "-m", "nonsense", "-o", str(tmp_path / "a.mp4")], "nonsense")


# --- serve: arguments checked before anything is created -----------------------------------


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_serve_port_out_of_range(tmp_path, port):
    refused(["serve", "--port", port, "--outputs", str(tmp_path / "srv")], "--port", port)
    assert not (tmp_path / "srv").exists()  # no database created


def test_serve_outputs_naming_a_file(tmp_path):
    (tmp_path / "afile").write_text("")
    refused(["serve", "--outputs", str(tmp_path / "afile")], "--outputs", "is a file")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_serve_device_cuda_without_cuda(tmp_path):
    refused(["serve", "--device", "cuda", "--outputs", str(tmp_path / "srv")], "--device cuda")
    assert not (tmp_path / "srv").exists()


def test_serve_help_says_the_token_shows_in_ps():
    r = runner.invoke(app, ["serve", "--help"], terminal_width=200)
    assert r.exit_code == 0 and "VIDMOE_TOKEN" in r.output and "ps" in r.output


# --- --sigmas and --timesteps ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--sigmas", "1.5,0.5", "--sigmas values must lie in [0, 1]"),
        ("--sigmas", "1,nan", "--sigmas"),
        ("--sigmas", "1,abc", "--sigmas"),
        ("--sigmas", "", "--sigmas"),
        ("--timesteps", "1000,2000", "--timesteps values must lie in [0, 1000]"),
        ("--timesteps", "0.9,0.5", "--sigmas 0.9,0.5"),
    ],
)
def test_schedule_values_out_of_range_name_the_flag(flag, value, needle):
    refused(["plan", "t2v-A14B", flag, value], needle)


def test_sigmas_and_timesteps_together_are_refused():
    refused(["plan", "t2v-A14B", "--sigmas", "1,0.5", "--timesteps", "1000,500"], "not both")


def test_timesteps_are_sigmas_times_1000():
    a = runner.invoke(app, ["plan", "t2v-A14B", "--timesteps", "1000,750,500,250"])
    b = runner.invoke(app, ["plan", "t2v-A14B", "--sigmas", "1,0.75,0.5,0.25"])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert a.output == b.output and "0.7500" in a.output


# --- one line, not a traceback, from the real console entry point --------------------------


def _cli(*args: str, env: dict | None = None, cwd: Path | None = None, umask: int = -1):
    environ = {k: v for k, v in os.environ.items() if k != "VIDMOE_DEBUG"}
    environ.update(PYTHONPATH=str(SRC), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "vidmoe.cli", *args],
        capture_output=True,
        text=True,
        env=environ,
        cwd=cwd,
        umask=umask,
        timeout=300,
    )


def test_console_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    args = ("generate", "x", "-m", "tiny-t2v", "--device", "banana", "-o", str(tmp_path / "a.mp4"))
    plain = _cli(*args)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().count("\n") == 0 and "banana" in plain.stderr
    debug = _cli(*args, env={"VIDMOE_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


# --- the output pair ------------------------------------------------------------------------


def test_same_seed_same_bytes_and_normal_permissions(tmp_path):
    """Two processes, same seed: identical mp4 bytes (x264's mbtree made them differ at width 64);
    the files get 0666 less the umask, not mkstemp's 0600."""
    args = ["generate", "a red circle", *TINY, "--seed", "5"]
    first = _cli(*args, "-o", str(tmp_path / "a.mp4"), umask=0o027)
    second = _cli(*args, "-o", str(tmp_path / "b.mp4"), umask=0o027)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    for file in ["a.mp4", "a.mp4.json"]:
        assert (tmp_path / file).stat().st_mode & 0o777 == 0o640
    assert video_matches_record(tmp_path / "a.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.mp4",
        "a.mp4.json",
        "b.mp4",
        "b.mp4.json",
    ]


FRAMES = np.random.default_rng(0).integers(0, 256, size=(5, 32, 48, 3), dtype=np.uint8)


def _old_pair(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    out = tmp_path / "clip.mp4"
    publish_video(FRAMES[:3], {"run": "old"}, out, fps=8)
    return out, out.read_bytes(), record_path(out).read_bytes()


def test_publish_writes_a_matching_pair(tmp_path):
    out, video, record = _old_pair(tmp_path)
    assert read_video(out)[0].shape == (3, 32, 48, 3)
    assert json.loads(record)["run"] == "old" and video_matches_record(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "clip.mp4.json"]


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failure_between_the_two_renames_keeps_the_old_pair(tmp_path, monkeypatch, failure):
    out, video, record = _old_pair(tmp_path)
    real_replace, calls = os.replace, []

    def replace(src, dst):  # the JSON is renamed first; fail on the mp4's rename
        calls.append(Path(dst).name)
        if Path(dst) == out:
            raise failure
        real_replace(src, dst)

    monkeypatch.setattr(video_io.os, "replace", replace)
    with pytest.raises(type(failure)):
        publish_video(FRAMES, {"run": "new"}, out, fps=8)
    assert calls[:2] == ["clip.mp4.json", "clip.mp4"]  # the failure was between the renames
    assert out.read_bytes() == video and record_path(out).read_bytes() == record
    assert video_matches_record(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "clip.mp4.json"]  # no temps


def test_real_failure_of_the_second_rename_restores_the_json(tmp_path):
    """No mock: the mp4's name is a non-empty folder, so its rename fails after the JSON's."""
    out = tmp_path / "clip.mp4"
    (out / "inside").mkdir(parents=True)
    record_path(out).write_text('{"run": "old"}')
    with pytest.raises(OSError):
        publish_video(FRAMES, {"run": "new"}, out, fps=8)
    assert record_path(out).read_text() == '{"run": "old"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "clip.mp4.json"]


def test_ctrl_c_during_the_renames_waits_for_the_new_pair(tmp_path, monkeypatch):
    out, _, _ = _old_pair(tmp_path)
    real_replace = os.replace

    def replace(src, dst):  # a real SIGINT arrives right after the first rename
        real_replace(src, dst)
        if Path(dst) == record_path(out):
            # to this (the main) thread: a process-wide kill() may land on another thread,
            # whose C handler can run only after the renames on a loaded machine
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    monkeypatch.setattr(video_io.os, "replace", replace)
    # Ctrl-C as a terminal's Python has it, whatever earlier tests in this process left there
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            publish_video(FRAMES, {"run": "new"}, out, fps=8)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert json.loads(record_path(out).read_text())["run"] == "new" and video_matches_record(out)
    assert read_video(out)[0].shape == FRAMES.shape


def test_a_hard_crash_between_the_renames_is_detectable(tmp_path):
    """What SIGKILL between the renames would leave (new JSON, old mp4) fails the checksum."""
    out, video, _ = _old_pair(tmp_path)
    publish_video(FRAMES, {"run": "new"}, out, fps=8)
    out.write_bytes(video)
    assert not video_matches_record(out)


# --- needs core's shared validation of settings (src/vidmoe/sampling/settings.py) ------------


@pytest.mark.parametrize(
    "extra",
    [["-g", "high_noise=nan"], ["-g", "low_noise=inf"], ["-W", "0"], ["--shift", "nan"]],
)
def test_bad_settings_values_needs_core_validation(tmp_path, extra):
    args = ["generate", "x", "-m", "tiny-t2v", "-f", "1", "-s", "1", "-q", *extra]
    refused([*args, "-o", str(tmp_path / "a.mp4")])
    assert not (tmp_path / "a.mp4").exists()
