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


PHASES = (
    "",
    "_decay",
    "_captions",
    "_restart",
    "_restart2",
    "_restart3",
    "_restart4",
    "_restart5",
    "_restart6",
    "_restart7",
)  # train_{expert}{phase}.toml, in the order they run
# then these fine-tuning runs, each from the export of the one before: (phase, device)
FINETUNE_PHASES = (("_gpu", "cuda"), ("_gpu2", "cuda"), ("_cpu3", "cpu"))
MORE_FINETUNE_PHASES = {"low_noise": (("_cpu4", "cpu"),)}  # v14: the low-noise expert only


def test_shipped_vae_stage_config_describes_the_shipped_vae():
    """The VAE's decoder-only stage config builds the shipped VAE's architecture and keeps its
    encoder (so the latent statistics and caches the experts were trained on stay valid)."""
    import dataclasses

    from vidmoe.training.vae_train import load_vae_train_config

    shipped = model_config_for(None).vae
    cfg, _, init = load_vae_train_config(DEMO_DIR / "train_vae_decoder.toml")
    assert cfg.vae == dataclasses.replace(shipped, latents_mean=(), latents_std=())
    assert (
        init is not None
        and cfg.freeze_encoder
        and cfg.edge_weight > 0
        and cfg.shapes.count("star") > 1
    )


@pytest.mark.parametrize("expert", ["high_noise", "low_noise"])
def test_shipped_training_configs_describe_the_shipped_experts(expert):
    """Each expert's training phases (lr constant, then cosine decay, possibly in parts, each
    resuming the one before) build exactly the architecture and MoE split the shipped model uses."""
    from vidmoe.training.config import load_train_config

    config = model_config_for(None)
    paths = [DEMO_DIR / f"train_{expert}{p}.toml" for p in PHASES]
    phases = [load_train_config(p) for p in paths if p.is_file()]
    assert len(phases) >= 2 and paths[0].is_file() and paths[1].is_file()
    for cfg in phases:
        assert cfg.transformer_for(expert) == config.transformer_for(expert)
        assert cfg.experts == (expert,)
        assert (cfg.moe.expert_names, cfg.moe.boundaries) == (
            config.moe.expert_names,
            config.moe.boundaries,
        )
    assert [c.lr_schedule for c in phases] == ["constant"] + ["cosine"] * (len(phases) - 1)
    assert len({c.out_dir for c in phases}) == 1  # each phase resumes the one before
    ends = [c.last_step for c in phases]
    assert ends == sorted(set(ends)), ends
    for prev, cfg in zip(phases, phases[1:]):  # a warm restart starts where the phase before ended
        assert cfg.schedule_start in (0, prev.last_step), (cfg.schedule_start, prev.last_step)
    # what may change between phases: the schedule's length and end, the cache (the same clips,
    # recaptioned), the CPU threads (the same arithmetic) and, for a warm restart, its peak lr,
    # start step and the arithmetic (bf16 autocast, torch.compile), and how often each clip is drawn
    varying = ("lr_schedule", "max_steps", "stop_step", "cache", "num_threads", "lr", "schedule_start",
               "use_bf16", "compile", "oversample")  # fmt: skip
    first = {k: v for k, v in phases[0].to_dict().items() if k not in varying}
    assert all({k: v for k, v in c.to_dict().items() if k not in varying} == first for c in phases)
    # the fine-tuning phases: runs each from the export of the phases before (init), of the
    # same expert and objective; they may change the run's size, schedule, seed and place only
    run_keys = ("out_dir", "init", "device", "batch_size", "warmup_steps", "log_every",
                "checkpoint_every", "seed")  # fmt: skip
    last = {k: v for k, v in phases[-1].to_dict().items() if k not in varying + run_keys}
    out_dirs = {phases[-1].out_dir}
    for phase, device in FINETUNE_PHASES + MORE_FINETUNE_PHASES.get(expert, ()):
        cfg = load_train_config(DEMO_DIR / f"train_{expert}{phase}.toml")
        assert cfg.transformer_for(expert) == config.transformer_for(expert)
        assert cfg.experts == (expert,) and cfg.init and cfg.device == device
        assert 0 <= cfg.stop_step <= cfg.max_steps and cfg.lr_schedule == "cosine"
        assert cfg.out_dir not in out_dirs  # a new run, not a resume
        out_dirs.add(cfg.out_dir)
        assert {k: v for k, v in cfg.to_dict().items() if k not in varying + run_keys} == last
