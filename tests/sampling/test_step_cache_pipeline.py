"""The step cache in the sampling loop: off by default and at 0, per expert, fresh at each
expert's phase, recorded in the trace; bad values refused with the field named."""

import pytest
import torch

from vidmoe.loading import build_random_pipeline
from vidmoe.presets import get_preset
from vidmoe.sampling.settings import GenerateSettings, resolve_settings


@pytest.fixture(scope="module")
def t2v():
    return build_random_pipeline("tiny-t2v")


def test_zero_threshold_is_the_uncached_run(t2v):
    a = t2v.generate("a cat", seed=3, num_steps=6, output="latents")
    b = t2v.generate("a cat", seed=3, num_steps=6, output="latents", step_cache=0.0)
    assert torch.equal(a.latents, b.latents)
    assert not any("cached" in row for row in b.trace)


def test_cache_skips_steps_per_expert_and_restarts_at_the_switch(t2v):
    r = t2v.generate(
        "a cat",
        seed=3,
        num_steps=8,
        boundary="steps:4",
        output="latents",
        step_cache={"high_noise": 100.0, "low_noise": 100.0},
    )
    cached = [row.get("cached", []) for row in r.trace]
    # each phase: its first step runs in full (a fresh cache), then at most 2 cached in a row
    assert cached == [[], ["high_noise"], ["high_noise"], []] + [
        [],
        ["low_noise"],
        ["low_noise"],
        [],
    ]
    full = t2v.generate("a cat", seed=3, num_steps=8, boundary="steps:4", output="latents")
    assert not torch.equal(r.latents, full.latents)  # an approximation, not the same run
    only_low = t2v.generate(
        "a cat",
        seed=3,
        num_steps=8,
        boundary="steps:4",
        output="latents",
        step_cache={"low_noise": 100.0},
    )
    assert all(c != ["high_noise"] for c in (row.get("cached", []) for row in only_low.trace))
    assert only_low.settings.step_cache == {"high_noise": 0.0, "low_noise": 100.0}


@pytest.mark.parametrize(
    "value, message",
    [
        ({"mid_noise": 0.1}, "unknown expert 'mid_noise' in step_cache"),
        (-0.1, "step_cache for high_noise must be a number >= 0"),
        (float("nan"), "step_cache for high_noise must be a number >= 0"),
        ("0.1", "step_cache must be a dict"),
    ],
)
def test_bad_thresholds_are_refused(value, message):
    with pytest.raises(ValueError, match=message):
        resolve_settings(GenerateSettings(step_cache=value), get_preset("tiny-t2v"))
