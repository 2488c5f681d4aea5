"""Training configs are strict: an unknown key in any table, or a value of the wrong type, is
refused with its name, its table and what is accepted; `vidmoe train` and `vidmoe train-vae` say
so in one line (exit 2, no traceback); the training modules import without a cycle."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.training.conftest import tiny_run
from vidmoe.cli import app
from vidmoe.training.config import LoraTrainConfig, TrainConfig, load_train_config
from vidmoe.training.vae_train import VAETrainConfig, load_vae_train_config

REPO = Path(__file__).resolve().parents[2]
TRAINING = REPO / "src" / "vidmoe" / "training"


def _with(d: dict, path: str, value) -> dict:
    """A deep copy of `d` with the key at dotted `path` set to `value` (tables made as needed)."""
    d = json.loads(json.dumps(d))
    *tables, key = path.split(".")
    at = d
    for t in tables:
        at = at.setdefault(t, {})
    at[key] = value
    return d


def _run(**changes) -> dict:
    return tiny_run("cache", "out", **changes)


# (dotted key, value, what the error must say)
UNKNOWN_KEYS = [
    ("batch_sise", 4, r"unknown key 'batch_sise' in the top level \(did you mean 'batch_size'\?\)"),
    ("transformer.dimm", 32, r"'dimm' in \[transformer\] \(did you mean 'dim'\?\)"),
    ("moe.boundary", [0.5], r"'boundary' in \[moe\] \(did you mean 'boundaries'\?\)"),
    ("lora.rnk", 4, r"'rnk' in \[lora\] \(did you mean 'rank'\?\)"),
    (
        "expert_overrides.low_noise.ffn_dm",
        64,
        r"'ffn_dm' in \[expert_overrides.low_noise\] \(did you mean 'ffn_dim'\?\)",
    ),
    (
        "zzz",
        1,
        r"unknown key 'zzz' in the top level; accepted keys there: band_training, batch_size, cache",
    ),
]


@pytest.mark.parametrize(("key", "value", "message"), UNKNOWN_KEYS)
def test_an_unknown_key_is_refused_with_its_table_and_the_accepted_keys(key, value, message):
    with pytest.raises(ValueError, match=message) as e:
        TrainConfig.from_dict(_with(_run(), key, value))
    assert "accepted keys there:" in str(e.value)


# (dotted key, value, what the error must say)
WRONG_TYPES = [
    (
        "batch_size",
        "16",
        r"batch_size = '16' has the wrong type: expected an integer, got a string",
    ),
    ("batch_size", 16.0, r"batch_size = 16.0 .*expected an integer, got a number"),
    ("use_bf16", 1, r"use_bf16 = 1 .*expected true or false, got an integer"),
    ("lr", True, r"lr = True .*expected a number, got a boolean"),
    ("experts", "low_noise", r"experts = 'low_noise' .*expected a list of strings, got a string"),
    ("oversample", {"star": "2"}, r"oversample = \{'star': '2'\} .*expected a table of integers"),
    ("moe.boundaries", 0.5, r"\[moe\] boundaries = 0.5 .*expected a list of numbers, got a number"),
    ("moe.guidance", [4.0, "x"], r"\[moe\] guidance .*got a list of 2 holding 'x', a string"),
    (
        "transformer.patch_size",
        [1, 2],
        r"\[transformer\] patch_size = \[1, 2\] .*expected a list of 3 integers, got a list of 2",
    ),
    ("lora.targets", "ffn.0", r"\[lora\] targets = 'ffn.0' .*expected a list of strings"),
    (
        "expert_overrides.low_noise.ffn_dim",
        "64",
        r"\[expert_overrides.low_noise\] ffn_dim = '64' .*expected an integer",
    ),
    ("moe", 3, r"\[moe\] must be a table of MoEConfig fields; got 3"),
    ("lora", [], r"\[lora\] must be a table of LoraTrainConfig fields"),
    ("expert_overrides", {"low_noise": 1}, r"\[expert_overrides.low_noise\] must be a table"),
]


@pytest.mark.parametrize(("key", "value", "message"), WRONG_TYPES)
def test_a_value_of_the_wrong_type_is_refused_with_the_field_value_and_type(key, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(_with(_run(), key, value))


# (changes to a valid dict, what the error must say)
OTHER_ERRORS = [
    (
        {"lora_rank": 16, "lora_alpha": 8.0},
        r"lora_rank, lora_alpha: the LoRA settings moved to the \[lora\] table; write \[lora\] with "
        r"rank = 16, alpha = 8.0",
    ),
    ({"lora": {"rank": -1}}, r"\[lora\]: rank must be >= 0"),
    ({"lora": {"rank": 4, "targets": []}}, r"\[lora\]: targets is empty"),
    (
        {"transformer": {"dim": 30, "num_heads": 4}},
        r"\[transformer\]: dim \(30\) must be divisible by num_heads \(4\)",
    ),
    ({"moe": {"boundaries": [0.5, 0.2]}}, r"\[moe\]: 2 experts need 1 boundaries"),
    ({"expert_overrides": {"low": {"ffn_dim": 64}}}, r"unknown experts \['low'\]"),
    ({"lr_schedule": "linear"}, r"lr_schedule must be one of \('constant', 'cosine'\)"),
    ({"sigma_sampling": "normal"}, r"sigma_sampling must be one of \('uniform', 'logit_normal'\)"),
    ({"num_threads": -1}, r"num_threads must be >= 0 \(0: torch's default\); got -1"),
    ({"lr": 0.0}, r"lr must be > 0; got 0.0"),
    ({"ema_decay": 1.5}, r"ema_decay must be in \[0, 1\]; got 1.5"),
]


@pytest.mark.parametrize(("changes", "message"), OTHER_ERRORS)
def test_values_are_checked_in_their_table(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(_run(**changes))


@pytest.mark.parametrize("key", ["cache", "out_dir", "transformer"])
def test_a_missing_required_key_is_named(key):
    d = _run()
    del d[key]
    want = "the top level lacks the required " + (
        "[transformer] table" if key == "transformer" else repr(key)
    )
    with pytest.raises(ValueError, match=want.replace("[", r"\[").replace("]", r"\]")):
        TrainConfig.from_dict(d)


def test_values_are_stored_in_their_fields_types_and_survive_a_json_round_trip():
    d = _run(
        lr=1,
        moe={"boundaries": [0.5], "guidance": [4, 3]},
        experts=["low_noise"],
        lora={"rank": 4, "alpha": 8, "targets": ["ffn.0"]},
        oversample={"star": 2},
        expert_overrides={"low_noise": {"ffn_dim": 96, "window_size": [-1, 4]}},
    )
    cfg = TrainConfig.from_dict(d)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.moe.guidance == (4.0, 3.0) and all(isinstance(g, float) for g in cfg.moe.guidance)
    assert cfg.experts == ("low_noise",)
    assert cfg.lora == LoraTrainConfig(rank=4, alpha=8.0, targets=("ffn.0",))
    assert cfg.lora.scale_alpha == 8.0 and LoraTrainConfig(rank=4).scale_alpha == 4
    assert cfg.transformer_for("low_noise").window_size == (-1, 4)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_a_toml_error_names_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'cache = "c"\nout_dir = "o"\n[transformer]\ndim = 32\nnum_heads = 2\n'
        "[moe]\nguidance = [4.0, 3.0]\nbandd = 0.1\n"
    )
    with pytest.raises(ValueError, match=rf"train config {path}: unknown key 'bandd' in \[moe\]"):
        load_train_config(path)


def test_every_shipped_training_config_loads():
    """The demo's and the recipes' configs (wherever they live) pass the strict reading."""
    paths = [
        p
        for folder in ("src/vidmoe/assets/demo", "recipes")
        for p in sorted((REPO / folder).glob("**/*.toml"))
    ]
    assert any("vae" not in p.name for p in paths) and any("vae" in p.name for p in paths)
    for path in paths:
        loaded = load_vae_train_config(path) if "vae" in path.name else load_train_config(path)
        assert loaded


# -- VAE training configs ------------------------------------------------------------------------
VAE_RUN = {
    "out_dir": "o",
    "crop": 0,
    "vae": {"dim": 8, "dim_mult": [1, 2], "z_dim": 4, "temperal_downsample": [True]},
}
VAE_ERRORS = [
    (
        "crops",
        0,
        r"unknown key 'crops' in the top level \(did you mean 'crop'\?\); accepted keys "
        r"there: anchor_weight, batch_size, border_change_weight, border_weight, border_width, "
        r"checkpoint_every, .*init.*out_dir",
    ),
    ("vae.z_dimm", 4, r"unknown key 'z_dimm' in \[vae\] \(did you mean 'z_dim'\?\)"),
    ("crop", "32", r"crop = '32' has the wrong type: expected an integer, got a string"),
    ("vae.generation", 2.1, r"\[vae\] generation = 2.1 .*expected a string, got a number"),
    ("vae.dec_dim", "8", r"\[vae\] dec_dim = '8' .*expected an integer or null"),
    ("shapes", ["star", 3], r"shapes = .*got a list of 2 holding 3, an integer"),
    ("init", 3, r"init = 3 has the wrong type: expected a string"),
    ("vae.generation", "3", r"\[vae\]: VAE generation must be '2.1' or '2.2'"),
]


@pytest.mark.parametrize(("key", "value", "message"), VAE_ERRORS)
def test_vae_train_configs_are_strict(tmp_path, key, value, message):
    path = tmp_path / "vae.json"
    path.write_text(json.dumps(_with(VAE_RUN, key, value)))
    with pytest.raises(ValueError, match=rf"VAE train config {path}: {message}"):
        load_vae_train_config(path)


def test_a_vae_train_config_reads_its_run_keys(tmp_path):
    path = tmp_path / "vae.json"
    path.write_text(json.dumps({**VAE_RUN, "init": "a/vae.safetensors", "lr": 1}))
    cfg, out_dir, init = load_vae_train_config(path)
    assert (out_dir, init, cfg.lr, cfg.vae.dim_mult) == (
        Path("o"),
        Path("a/vae.safetensors"),
        1.0,
        (1, 2),
    )
    assert isinstance(cfg, VAETrainConfig) and cfg.vae.temperal_downsample == (True,)
    path.write_text(json.dumps({"crop": 0}))
    with pytest.raises(ValueError, match="needs out_dir"):
        load_vae_train_config(path)


# -- the CLI -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("verb", "text", "message"),
    [
        ("train", "[transformer]\ndim = 32\n", "the top level lacks the required 'cache'"),
        (
            "train",
            'cache = "c"\nout_dir = "o"\n[transformer]\nnum_layer = 1\n',
            "unknown key 'num_layer' in [transformer] (did you mean 'num_layers'?)",
        ),
        (
            "train",
            'cache = "c"\nout_dir = "o"\n[transformer]\n[moe]\nband = "wide"\n',
            "[moe] band = 'wide' has the wrong type: expected a number, got a string",
        ),
        ("train", "cache = \n", "is not valid toml"),
        ("train-vae", 'out_dir = "o"\nlr = "fast"\n', "lr = 'fast' has the wrong type"),
    ],
)
def test_the_cli_says_what_is_wrong_in_one_line(tmp_path, verb, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    result = CliRunner().invoke(app, [verb, str(path)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output, result.output
    assert "Traceback" not in result.output and result.exception.__class__ is SystemExit


# -- imports -------------------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    """The vidmoe.training modules a module imports anywhere (TYPE_CHECKING and functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {
            n.removeprefix("vidmoe.training.")
            for n in names
            if n.startswith("vidmoe.training.") and (TRAINING / f"{n[16:]}.py").is_file()
        }
    return out


def test_the_training_modules_import_each_other_without_a_cycle():
    graph = {p.stem: _imports(p) - {p.stem} for p in TRAINING.glob("*.py")}
    assert graph["loop"] >= {"config", "finetune"} and "finetune" not in graph["config"]
    done: list[str] = []
    while len(done) < len(graph):  # peel off modules whose imports are all done
        ready = [m for m, deps in graph.items() if m not in done and deps <= set(done)]
        assert ready, f"import cycle among {sorted(set(graph) - set(done))}: {graph}"
        done += ready


def test_each_config_module_imports_alone_in_a_fresh_interpreter():
    modules = ["config", "finetune", "loop", "vae_train"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", f"import vidmoe.training.{m}"],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for m in modules
    ]
    for m, p in zip(modules, procs):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, (m, err)
