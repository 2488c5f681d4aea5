"""Few-step inference: guidance 1 runs each expert once per step, per-expert step budgets, the
published recipes, per-step adapter strengths in the plan and the trace, and the CLI flags."""

import json

import pytest
from typer.testing import CliRunner

from tests.io.lora_files import random_lora, write_release
from vidmoe.cli import app, parse_lora_spec
from vidmoe.cli_common import _settings
from vidmoe.loading import build_random_pipeline
from vidmoe.presets import get_preset
from vidmoe.sampling.plan import make_plan, plan_for, with_adapter_scales
from vidmoe.sampling.recipes import RECIPES, apply_recipe
from vidmoe.sampling.settings import GenerateSettings, resolve_settings

runner = CliRunner()
CONFIG = get_preset("tiny-t2v")


@pytest.fixture(scope="module")
def pipe():
    return build_random_pipeline("tiny-t2v")


def small(**kw):
    return dict(num_frames=1, width=32, height=32, output="latents", **kw)


def test_guidance_one_calls_each_expert_once_per_step(pipe):
    calls = []
    hooks = [
        e.register_forward_hook(lambda m, a, o, n=n: calls.append((n, a[0].shape[0])))
        for n, e in pipe.experts.items()
    ]
    try:
        r = pipe.generate(
            "x",
            **small(
                steps_per_expert={"high_noise": 2, "low_noise": 3},
                guidance={"high_noise": 1.0, "low_noise": 1.0},
            ),
        )
    finally:
        for h in hooks:
            h.remove()
    assert calls == [("high_noise", 1)] * 2 + [("low_noise", 1)] * 3
    assert [s["experts"] for s in r.trace] == [["high_noise"]] * 2 + [["low_noise"]] * 3


def test_cli_steps_per_expert_gives_exactly_that_plan():
    s = _settings(steps="high_noise=2,low_noise=6")
    plan = plan_for(resolve_settings(s, CONFIG), CONFIG)
    assert [st.experts for st in plan.steps] == [("high_noise",)] * 2 + [("low_noise",)] * 6
    r = runner.invoke(app, ["plan", "tiny-t2v", "--steps", "high_noise=2,low_noise=6"])
    assert r.exit_code == 0 and "high_noise 2, low_noise 6 (total 8)" in r.output


def test_lightning_recipe_reproduces_the_published_grid():
    s = apply_recipe(GenerateSettings(), "lightning-4step")
    rs = resolve_settings(s, get_preset("t2v-A14B"))
    assert (rs.sampler, rs.shift, rs.guidance) == (
        "euler",
        5.0,
        {"high_noise": 1.0, "low_noise": 1.0},
    )
    plan = plan_for(rs, get_preset("t2v-A14B"))
    # shift 5 on linspace(1, 0, 5): Euler from [1, 0.9375, 0.8333, 0.625] to 0
    assert [st.sigma for st in plan.steps] == pytest.approx([1.0, 0.9375, 5 / 6, 0.625])
    assert plan.counts() == {"high_noise": 2, "low_noise": 2}
    # the release boundary (0.875 t2v, 0.9 i2v) splits this grid the same way
    for preset in ("t2v-A14B", "i2v-A14B"):
        moe = get_preset(preset).moe
        assert make_plan(moe, shift=5.0, sigmas=plan_sigmas(plan)).counts() == plan.counts()
    r = runner.invoke(app, ["plan", "t2v-A14B", "--recipe", "lightning-4step"])
    assert (
        r.exit_code == 0
        and "high_noise 2, low_noise 2 (total 4)" in r.output
        and "1.0000" in r.output
    )


def plan_sigmas(plan):
    return [st.sigma for st in plan.steps] + [0.0]


def test_explicit_settings_win_over_the_recipe():
    s = apply_recipe(
        GenerateSettings(num_steps=6, guidance={"low_noise": 2.0}, shift=3.0), "lightning-4step"
    )
    assert s.num_steps == 6 and not s.steps_per_expert and s.shift == 3.0
    assert s.guidance == {"high_noise": 1.0, "low_noise": 2.0} and s.sampler == "euler"
    with pytest.raises(ValueError, match="unknown recipe 'turbo'; known recipes: lightning-4step"):
        apply_recipe(GenerateSettings(), "turbo")
    assert all(r.source for r in RECIPES.values())


def test_plan_carries_per_step_adapter_strengths():
    plan = make_plan(CONFIG.moe, shift=5.0, sigmas=[1.0, 0.8, 0.5, 0.2, 0.0])
    plan = with_adapter_scales(
        plan, {"speed": {"high_noise": 0.8, "low_noise": 1.0}, "style": {"low_noise": 0.5}}
    )
    assert [st.adapter_scales for st in plan.steps] == [
        {"speed": 0.8},
        {"speed": 1.0, "style": 0.5},
        {"speed": 1.0, "style": 0.5},
        {"speed": 1.0, "style": 0.5},
    ]
    assert "speed=0.8" in plan.summary() and "style=0.5" in plan.summary()
    assert type(plan).from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    band = make_plan(
        get_preset("tiny-t2v").moe.__class__(boundaries=(0.6,), band=0.2),
        shift=5.0,
        sigmas=[1.0, 0.6, 0.2, 0.0],
    )
    blended = with_adapter_scales(band, {"speed": {"high_noise": 0.8, "low_noise": 1.0}}).steps[1]
    assert len(blended.experts) == 2 and blended.adapter_scales == {
        "high_noise/speed": 0.8,
        "low_noise/speed": 1.0,
    }


def test_pipeline_sets_each_experts_strength_before_its_steps(pipe, tmp_path):
    f = write_release(
        tmp_path / "speed.safetensors", random_lora(pipe.experts["high_noise"], seed=4)
    )
    pipe.load_lora(f, strength={"high_noise": 0.8, "low_noise": 0.3}, name="speed")
    seen = []
    from vidmoe.models.lora import adapter_strengths

    hooks = [
        e.register_forward_pre_hook(
            lambda m, a, n=n: seen.append((n, adapter_strengths(m)["speed"]))
        )
        for n, e in pipe.experts.items()
    ]
    try:
        r = pipe.generate("x", **small(steps_per_expert={"high_noise": 1, "low_noise": 2}))
    finally:
        for h in hooks:
            h.remove()
        pipe.unload_lora()
    assert seen == [("high_noise", 0.8), ("low_noise", 0.3), ("low_noise", 0.3)]
    assert [s["adapters"] for s in r.trace] == [{"speed": 0.8}, {"speed": 0.3}, {"speed": 0.3}]


def test_parse_lora_spec(tmp_path):
    assert parse_lora_spec("high_noise=a.safetensors:0.8") == ("high_noise", "a.safetensors", 0.8)
    assert parse_lora_spec("low_noise=dir/a.safetensors") == ("low_noise", "dir/a.safetensors", 1.0)
    assert parse_lora_spec("a.safetensors:0.5") == (None, "a.safetensors", 0.5)
    import typer

    with pytest.raises(typer.BadParameter, match="must be a number; got 'abc'"):
        parse_lora_spec("a.safetensors:abc")


def test_cli_generate_with_loras_recipe_and_fuse(tmp_path):
    expert = build_random_pipeline("tiny-t2v").experts["high_noise"]
    f = write_release(tmp_path / "lightning.safetensors", random_lora(expert, seed=5))
    out = tmp_path / "clip.mp4"
    r = runner.invoke(
        app,
        [
            "generate",
            "x",
            "-m",
            "tiny-t2v",
            "-f",
            "1",
            "-W",
            "32",
            "-H",
            "32",
            "--recipe",
            "lightning-4step",
            "--lora",
            f"high_noise={f}:0.8",
            "--lora",
            f"low_noise={f}",
            "--fuse-lora",
            "-o",
            str(out),
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "clip.mp4.json").read_text())
    (adapter,) = record["model"]["adapters"]
    assert adapter["format"] == "release" and adapter["strengths"] == {
        "high_noise": 0.8,
        "low_noise": 1.0,
    }
    assert len(adapter["sha256"]) == 64 and adapter["file"] == str(f)
    assert record["plan"]["counts"] == {"high_noise": 2, "low_noise": 2}
    assert record["settings"]["sampler"] == "euler" and record["recipe"] == "lightning-4step"
    assert [s["adapters"] for s in record["trace"]] == [{"lightning": 0.8}] * 2 + [
        {"lightning": 1.0}
    ] * 2
    r = runner.invoke(
        app, ["generate", "x", "-m", "tiny-t2v", "--lora", f"{f}:strong", "-o", str(out)]
    )
    assert r.exit_code != 0 and "must be a number" in r.output
    r = runner.invoke(
        app, ["generate", "x", "-m", "tiny-t2v", "--lora", f"mid_noise={f}", "-o", str(out)]
    )
    assert r.exit_code != 0 and "valid experts: high_noise, low_noise" in r.output
