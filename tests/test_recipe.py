"""The demo's recipe (recipes/demo): its configs describe the shipped model and chain only to
earlier steps, and the whole command sequence of run.sh runs at a reduced size."""

import dataclasses
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vidmoe.cli import app
from vidmoe.loading import DEMO_DIR, model_config_for
from vidmoe.training.config import load_train_config, read_config
from vidmoe.training.vae_train import load_vae_train_config

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "demo"
SMOKE_CLIPS = ["--clips", "2", "--start", "9"]  # per cache in the smoke run (clip 10 is a star:
# the phases that oversample stars need one)


def recipe_commands() -> list[list[str]]:
    """The `vidmoe ...` commands of recipes/demo/run.sh, in order, as argument lists."""
    lines = (RECIPE / "run.sh").read_text().splitlines()
    steps = [line for line in lines if "vidmoe " in line and not line.startswith("#")]
    return [shlex.split(line[line.index("vidmoe ") :])[1:] for line in steps]


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_every_recipe_config_is_in_run_sh_and_states_everything():
    named = {Path(a[1]).name for a in recipe_commands() if a[0] in ("train", "train-vae")}
    assert named == {p.name for p in RECIPE.glob("*.toml")}
    for path in RECIPE.glob("*.toml"):
        assert "base" not in read_config(path), f"{path.name} chains to another config"


def test_recipe_steps_read_only_what_earlier_steps_wrote():
    """Each config's cache, init and resumed out_dir, each cache's VAE and each export's runs come
    from an earlier step of run.sh; the final export holds the shipped model's architecture."""
    written: set[str] = set()
    for args in recipe_commands():
        verb = args[0]
        if verb == "train-vae":
            cfg, out_dir, init = load_vae_train_config(REPO / args[1])
            assert init is None or str(init) in written, (args[1], init)
            written.add(str(out_dir))
        elif verb == "cache":
            assert option(args, "--vae") in written
            written.add(args[1])
        elif verb == "train":
            cfg = load_train_config(REPO / args[1])
            assert cfg.cache in written, (args[1], cfg.cache)
            assert not cfg.init or cfg.init in written, (args[1], cfg.init)
            written.add(cfg.out_dir)
        elif verb == "export":
            runs = args[2 : args.index("--config")]
            assert all(r in written for r in runs) and option(args, "--vae") in written, args
            written.add(args[1])
        else:
            model = option(args, "--model") if verb == "generate" else args[1]
            assert verb in ("generate", "eval") and model in written, args


def test_recipe_describes_the_shipped_model():
    """The expert configs build the shipped experts' architecture and MoE split; the last VAE
    stage builds the shipped VAE; model.json is the shipped vidmoe.json less its VAE."""
    shipped = model_config_for(None)
    for path in RECIPE.glob("*_noise_*.toml"):
        cfg = load_train_config(path)
        (expert,) = cfg.experts
        assert path.name.startswith(expert)
        assert cfg.transformer_for(expert) == shipped.transformer_for(expert), path.name
        assert cfg.moe.expert_names == shipped.moe.expert_names
        assert cfg.moe.boundaries == shipped.moe.boundaries
    vae_cfg, _, _ = load_vae_train_config(RECIPE / "vae_7_first_chunk_head.toml")
    assert vae_cfg.vae == dataclasses.replace(shipped.vae, latents_mean=(), latents_std=())
    model = json.loads((RECIPE / "model.json").read_text())
    shipped_json = json.loads((DEMO_DIR / "vidmoe.json").read_text())
    assert model == {k: v for k, v in shipped_json.items() if k != "vae"}


def test_resumed_phases_keep_the_run_and_its_objective():
    """Phases that share an out_dir resume one another: each starts where the one before ended
    and changes only the schedule, data mix and arithmetic, never the model or objective."""
    varying = {
        "lr_schedule",
        "max_steps",
        "stop_step",
        "cache",
        "num_threads",
        "lr",
        "schedule_start",
        "use_bf16",
        "compile",
        "oversample",
    }
    by_run: dict[str, list] = {}
    for args in recipe_commands():
        if args[0] == "train":
            cfg = load_train_config(REPO / args[1])
            by_run.setdefault(cfg.out_dir, []).append(cfg)
    assert max(len(v) for v in by_run.values()) == 10  # the low-noise expert's CPU phases
    for phases in by_run.values():
        first = {k: v for k, v in phases[0].to_dict().items() if k not in varying}
        for prev, cfg in zip(phases, phases[1:]):
            assert {k: v for k, v in cfg.to_dict().items() if k not in varying} == first
            assert cfg.schedule_start in (0, prev.last_step) and cfg.last_step > prev.last_step


SMOKE_TRANSFORMER = {"num_layers": 1, "ffn_dim": 128}  # the experts at a reduced size


def _smoke_train_config(path: Path, done: dict[str, int]) -> dict:
    """A recipe phase at a reduced size: 1 step of batch 2 on the CPU, one block per expert, the
    same resume and init chain."""
    d = read_config(path)
    start = done.get(d["out_dir"], 0)
    d.update(
        max_steps=start + 1,
        stop_step=0,
        warmup_steps=1,
        batch_size=2,
        device="cpu",
        compile=False,
        use_bf16=False,
        num_threads=0,
        log_every=1,
        checkpoint_every=100,
        use_progress=False,
        schedule_start=start if d.get("schedule_start") else 0,
        transformer={**d["transformer"], **SMOKE_TRANSFORMER},
    )
    done[d["out_dir"]] = start + 1
    return d


def _smoke_vae_config(path: Path) -> dict:
    """A VAE stage at a reduced size: 1 step on small clips, a third of the width (the latent
    grid, hence the experts, stay as they are)."""
    d = read_config(path, "VAE train config")
    d.update(
        max_steps=1,
        stop_step=0,
        batch_size=1,
        width=32,
        height=32,
        clip_frames=5,
        window_frames=5,
        crop=min(d["crop"], 16),
        num_stat_clips=1,
        num_threads=0,
        max_minutes=10.0,
        vae={**d["vae"], "dim": 8},
    )
    return d


def _write_toml(d: dict, path: Path) -> None:
    def value(v):
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return json.dumps(v)  # strings, numbers, booleans and lists are valid TOML so

    tables = {k: v for k, v in d.items() if isinstance(v, dict) and k != "oversample"}
    lines = [f"{k} = {value(v)}" for k, v in d.items() if k not in tables]
    for name, table in tables.items():
        nested = {k: v for k, v in table.items() if isinstance(v, dict)}
        lines += [f"[{name}]"] + [f"{k} = {value(v)}" for k, v in table.items() if k not in nested]
        for sub, values in nested.items():
            lines += [f"[{name}.{sub}]"] + [f"{k} = {value(v)}" for k, v in values.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _smoke_args(args: list[str], done: dict[str, int]) -> list[str]:
    """The run.sh command at a reduced size, its files under the working directory."""
    verb = args[0]
    if verb in ("train", "train-vae"):
        smaller = _smoke_train_config if verb == "train" else lambda p, _: _smoke_vae_config(p)
        _write_toml(smaller(REPO / args[1], done), Path(args[1]))
    elif verb == "export":
        model = json.loads((REPO / option(args, "--config")).read_text())
        model["transformer"].update(SMOKE_TRANSFORMER)
        Path(option(args, "--config")).write_text(json.dumps(model))
    elif verb == "cache":
        i = args.index("--clips")
        args = [*args[:i], *args[i + 2 :], *SMOKE_CLIPS, "--quiet"]
    elif verb == "generate":
        args = [*args, "--steps", "2", "--quiet"]
    elif verb == "eval":
        args = [args[0], args[1], "--prompts", "1", "--steps", "2"]
    return args


def test_the_whole_recipe_runs_at_a_reduced_size(tmp_path, monkeypatch):
    """run.sh, every step in order (1 step per phase, 2 clips per cache), ends in a model
    folder that load_pipeline reads and generates with."""
    import vidmoe

    monkeypatch.chdir(tmp_path)
    runner, done = CliRunner(), {}
    for args in recipe_commands():
        args = _smoke_args(args, done)
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output, result.exception)
    assert done["runs/demo/low_noise"] == 10  # ten phases, each resuming the one before
    frames = (
        vidmoe.load_pipeline(tmp_path / "runs/demo/model", device="cpu")
        .generate("a red circle moving to the right", num_steps=2, seed=0)
        .frames
    )
    assert frames.shape == (17, 64, 64, 3) and frames.dtype == np.uint8
    assert (tmp_path / "outputs/recipe_red_circle.mp4").stat().st_size > 0


@pytest.mark.parametrize("vocabulary", ["base", "extended", "rich"])
def test_cache_verb_builds_the_world_cache_the_trainer_reads(tmp_path, vocabulary):
    from vidmoe.training.data import LatentCache
    from vidmoe.world.shapes import demo_world

    out = tmp_path / "cache"
    args = [
        "cache",
        str(out),
        "--clips",
        "3",
        "--start",
        "5",
        "--captions",
        "2",
        "--quiet",
        "--vocabulary",
        vocabulary,
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    cache = LatentCache(out)
    assert cache.latents.shape == (3, 16, 5, 16, 16) and cache.captions_per_clip == 2
    assert cache.caption_variants == [demo_world(vocabulary).captions(i, 2) for i in (5, 6, 7)]
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already holds a latent cache" in again.output


def test_cache_verb_reads_a_video_folder_and_refuses_bad_input(tmp_path):
    from vidmoe.training.data import LatentCache
    from vidmoe.world.shapes import ShapesWorld, write_dataset

    write_dataset(tmp_path / "videos", 2, world=ShapesWorld(32, 32, 9, seed=3))
    out = tmp_path / "cache"
    args = ["cache", str(out), "--videos", str(tmp_path / "videos"), "--frames", "9", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert LatentCache(out).latents.shape == (2, 16, 3, 16, 16)  # resized to 64x64, 9 frames
    for bad, message in (
        (["--clips", "0"], "give the number of clips"),
        (["--clips", "2", "--vocabulary", "klingon"], "klingon"),
    ):
        result = CliRunner().invoke(app, ["cache", str(tmp_path / "c2"), *bad])
        assert result.exit_code == 2 and message in result.output, result.output


def test_vae_stop_step_is_checked_and_kept_out_of_the_resume_identity():
    """A VAE stage may end before its cosine does (the recipe repeats time-limited stages so);
    a stop past the schedule is refused, and changing it does not block a resume."""
    from vidmoe.training.vae_train import VAETrainConfig, _comparable

    with pytest.raises(ValueError, match=r"stop_step must be in \[0, max_steps=10\]"):
        VAETrainConfig(max_steps=10, stop_step=11)
    assert _comparable(VAETrainConfig(max_steps=10, stop_step=4)) == _comparable(
        VAETrainConfig(max_steps=10)
    )
