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
    result = CliRunner().invoke(app, ["generate", "a red circle moving to the right", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    frames, fps = read_video(out)
    config = model_config_for(None)
    assert frames.shape == (config.default_num_frames, config.default_size[1], config.default_size[0], 3)
    assert fps == config.fps


@pytest.mark.parametrize("seed", [3])
def test_demo_is_deterministic_by_seed(seed):
    pipe = load_pipeline(None, device="cpu")
    a = pipe.generate("a blue square moving up", seed=seed, num_steps=4).frames
    b = pipe.generate("a blue square moving up", seed=seed, num_steps=4).frames
    assert np.array_equal(a, b)


@pytest.mark.parametrize("expert", ["high_noise", "low_noise"])
def test_shipped_training_configs_describe_the_shipped_experts(expert):
    """Each expert's two training phases (lr constant, then a cosine decay that resumes it) build
    exactly the architecture and MoE split the shipped model uses."""
    from vidmoe.training.config import load_train_config

    config = model_config_for(None)
    phase1 = load_train_config(DEMO_DIR / f"train_{expert}.toml")
    phase2 = load_train_config(DEMO_DIR / f"train_{expert}_decay.toml")
    for cfg in (phase1, phase2):
        assert cfg.transformer_for(expert) == config.transformer_for(expert)
        assert cfg.experts == (expert,)
        assert (cfg.moe.expert_names, cfg.moe.boundaries) == (config.moe.expert_names, config.moe.boundaries)
    assert (phase1.lr_schedule, phase2.lr_schedule) == ("constant", "cosine")
    assert phase2.out_dir == phase1.out_dir and phase2.cache == phase1.cache  # phase 2 resumes phase 1
    assert phase2.max_steps > phase1.max_steps
    assert {k: v for k, v in phase1.to_dict().items() if k not in ("lr_schedule", "max_steps")} == {
        k: v for k, v in phase2.to_dict().items() if k not in ("lr_schedule", "max_steps")
    }
