"""The command line end to end: generate writes a playable mp4 and its JSON; info and plan print."""

import json

from typer.testing import CliRunner

from vidmoe.cli import app
from vidmoe.io.video import read_video

runner = CliRunner()


def test_generate_tiny_preset_writes_mp4_and_settings(tmp_path):
    out = tmp_path / "clip.mp4"
    r = runner.invoke(
        app,
        [
            "generate",
            "a red circle",
            "-m",
            "tiny-t2v",
            "-f",
            "9",
            "-W",
            "64",
            "-H",
            "48",
            "-s",
            "3",
            "--seed",
            "3",
            "-o",
            str(out),
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    frames, fps = read_video(out)
    assert frames.shape == (9, 48, 64, 3) and fps == 16
    record = json.loads((tmp_path / "clip.mp4.json").read_text())
    assert record["settings"]["seed"] == 3 and len(record["trace"]) == 3
    assert record["plan"]["steps"][0]["experts"] == ["high_noise"]


def test_generate_rejects_bad_frames_before_loading(tmp_path):
    r = runner.invoke(
        app, ["generate", "x", "-m", "t2v-A14B", "-f", "80", "-o", str(tmp_path / "a.mp4")]
    )
    assert r.exit_code == 2
    assert "num_frames must be 4k+1" in r.output and "use 77 or 81" in r.output
    assert not (tmp_path / "a.mp4").exists()


def test_generate_rejects_malformed_guidance():
    r = runner.invoke(app, ["generate", "x", "-m", "tiny-t2v", "--guidance", "high_noise:4"])
    assert r.exit_code != 0 and "NAME=VALUE" in r.output


def test_info_reports_total_and_active_parameters():
    r = runner.invoke(app, ["info", "t2v-A14B"])
    assert r.exit_code == 0, r.output
    assert "28.6B" in r.output and "14.3B" in r.output and "0.875" in r.output
    assert "high_noise 26, low_noise 14" in r.output


def test_plan_with_step_budgets():
    r = runner.invoke(app, ["plan", "t2v-A14B", "--steps", "high_noise=2,low_noise=6"])
    assert r.exit_code == 0, r.output
    assert "high_noise 2, low_noise 6" in r.output


def test_generate_from_official_layout_folder(tmp_path):
    from tests.checkpoints import write_tiny_official

    folder = write_tiny_official(tmp_path / "Wan2.2-tiny")
    out = tmp_path / "official.mp4"
    r = runner.invoke(
        app,
        [
            "generate",
            "a red circle",
            "-m",
            str(folder),
            "-f",
            "5",
            "-W",
            "32",
            "-H",
            "32",
            "-s",
            "2",
            "-o",
            str(out),
            "--dtype",
            "float32",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    frames, _ = read_video(out)
    assert frames.shape == (5, 32, 32, 3)


def test_unknown_folder_layout_is_a_clear_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"nothing")
    r = runner.invoke(app, ["generate", "x", "-m", str(tmp_path)])
    assert r.exit_code == 2 and "official" in r.output and "diffusers" in r.output


def test_experts_with_different_configs_are_refused(tmp_path):
    import json

    from tests.checkpoints import write_tiny_official

    folder = write_tiny_official(tmp_path / "mixed")
    cfg_path = folder / "low_noise_model" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_layers"] = 3
    cfg_path.write_text(json.dumps(cfg))
    r = runner.invoke(app, ["info", str(folder)])
    assert r.exit_code == 2 and "num_layers" in r.output
