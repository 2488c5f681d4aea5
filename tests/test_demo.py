"""The shipped demo model: the README's main command works offline out of the box."""

import numpy as np
import pytest
from typer.testing import CliRunner

from vidmoe.cli import app
from vidmoe.io.video import read_video
from vidmoe.loading import DEMO_DIR, load_pipeline, model_config_for


def test_demo_model_is_shipped_small_and_complete():
    files = [p for p in DEMO_DIR.rglob("*") if p.is_file()]
    assert (DEMO_DIR / "vidmoe.json").exists(), f"demo model missing from {DEMO_DIR}"
    assert sum(p.stat().st_size for p in files) < 40 * 2**20
    config = model_config_for(None)
    assert config.moe.expert_names == ("high_noise", "low_noise")
    assert config.text_encoder == "minilm"
    assert config.default_num_frames >= 17 and min(config.default_size) >= 64


def test_main_command_makes_the_default_clip(tmp_path):
    out = tmp_path / "red.mp4"
    result = CliRunner().invoke(
        app, ["generate", "a red circle moving to the right", "-o", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    frames, fps = read_video(out)
    config = model_config_for(None)
    assert frames.shape == (
        config.default_num_frames,
        config.default_size[1],
        config.default_size[0],
        3,
    )
    assert fps == config.fps


@pytest.mark.parametrize("seed", [3])
def test_demo_is_deterministic_by_seed(seed):
    pipe = load_pipeline(None, device="cpu")
    a = pipe.generate("a blue square moving up", seed=seed, num_steps=4).frames
    b = pipe.generate("a blue square moving up", seed=seed, num_steps=4).frames
    assert np.array_equal(a, b)


def test_the_package_holds_only_what_the_runtime_reads():
    """The demo folder is the model: its config, VAE and experts (the recipe that rebuilds it is
    recipes/demo, checked by tests/test_recipe.py)."""
    files = sorted(str(p.relative_to(DEMO_DIR)) for p in DEMO_DIR.rglob("*") if p.is_file())
    assert files == [
        "experts/high_noise.safetensors",
        "experts/low_noise.safetensors",
        "vae.safetensors",
        "vidmoe.json",
    ]
