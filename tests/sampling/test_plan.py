"""The per-step phase plan and the boundary modes."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from vidmoe.config import MoEConfig
from vidmoe.presets import PRESETS
from vidmoe.sampling.boundary import (
    Budgets,
    Calibrated,
    calibrated_boundaries,
    resolve_boundary,
    snr,
)
from vidmoe.sampling.plan import Plan, build_plan, make_plan
from vidmoe.sampling.schedules import make_sigmas

T2V = PRESETS["t2v-A14B"].moe
I2V = PRESETS["i2v-A14B"].moe
K3 = MoEConfig(expert_names=("a", "b", "c"), boundaries=(0.8, 0.4), guidance=(5.0, 4.0, 3.0))


def high_steps(plan: Plan) -> list[int]:
    return [s.index for s in plan.steps if "high_noise" in s.experts]


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
@pytest.mark.parametrize(
    ("moe", "shift", "high_scale", "low_scale", "expected_high"),
    [(T2V, 12.0, 4.0, 3.0, 26), (I2V, 5.0, 3.5, 3.5, 15)],
)
def test_release_plans(solver, moe, shift, high_scale, low_scale, expected_high):
    sigmas = make_sigmas(40, shift, solver=solver)
    plan = build_plan(sigmas, moe)
    boundary = moe.boundaries[0]
    for step, sigma in zip(plan.steps, sigmas.tolist()):
        is_high = step.timestep >= boundary * 1000  # the release's rule
        assert step.experts == (("high_noise",) if is_high else ("low_noise",))
        assert step.weights == (1.0,)
        assert step.guidance == ((high_scale,) if is_high else (low_scale,))
        assert step.sigma == sigma and step.timestep == pytest.approx(1000 * sigma)
    assert high_steps(plan) == list(range(expected_high))  # a prefix of the run
    assert plan.counts() == {"high_noise": expected_high, "low_noise": 40 - expected_high}
    assert plan.steps[-1].sigma_next == 0.0


def test_three_expert_plan_partitions_steps_in_order():
    plan = build_plan(make_sigmas(20, 3.0), K3)
    owners = [s.experts[0] for s in plan.steps]
    assert owners == sorted(owners)  # a... then b... then c...
    for s in plan.steps:
        want = "a" if s.sigma >= 0.8 else "b" if s.sigma >= 0.4 else "c"
        assert s.experts == (want,) and s.guidance == ({"a": 5.0, "b": 4.0, "c": 3.0}[want],)
    assert sum(plan.counts().values()) == 20


def test_guidance_override_merges_over_config():
    plan = build_plan(make_sigmas(10, 12.0), T2V, guidance={"low_noise": 2.0})
    scales = {s.experts[0]: s.guidance[0] for s in plan.steps}
    assert scales == {"high_noise": 4.0, "low_noise": 2.0}
    with pytest.raises(ValueError, match="'medium'.*high_noise, low_noise"):
        build_plan(make_sigmas(10, 12.0), T2V, guidance={"medium": 2.0})
    with pytest.raises(ValueError, match="-1"):
        build_plan(make_sigmas(10, 12.0), T2V, guidance={"high_noise": -1.0})


def test_band_plan_blends_neighbours_with_weights_summing_to_one():
    plan = build_plan(make_sigmas(40, 12.0), dataclasses.replace(T2V, band=0.05))
    blended = [s for s in plan.steps if len(s.experts) == 2]
    assert blended
    for s in plan.steps:
        assert sum(s.weights) == pytest.approx(1.0)
        assert s.guidance == tuple({"high_noise": 4.0, "low_noise": 3.0}[n] for n in s.experts)
    for s in blended:
        assert abs(s.sigma - 0.875) < 0.05
    counts = plan.counts()
    assert counts["high_noise"] + counts["low_noise"] == 40 + len(blended)


@pytest.mark.parametrize("n", [1, 7, 39, 40])
def test_steps_mode_gives_exactly_n_high_steps(n):
    sigmas = make_sigmas(40, 12.0)
    b = resolve_boundary(f"steps:{n}", release=0.875, shift=12.0, num_steps=40, sigmas=sigmas)
    assert sigmas[n] < b < sigmas[n - 1]
    plan = make_plan(T2V, shift=12.0, num_steps=40, boundary=f"steps:{n}")
    assert high_steps(plan) == list(range(n))


@pytest.mark.parametrize("shift", [1.0, 5.0, 12.0])
@pytest.mark.parametrize("num_steps", [10, 40])
def test_snr_mode_splits_at_sqrt_snr_min(shift, num_steps):
    sigmas = make_sigmas(num_steps, shift).tolist()
    b = resolve_boundary("snr", release=0.875, shift=shift, num_steps=num_steps)
    threshold = math.sqrt(snr(sigmas[0]))  # half of SNR_min on a log axis
    plan = make_plan(T2V, shift=shift, num_steps=num_steps, boundary="snr")
    n = len(high_steps(plan))
    assert high_steps(plan) == list(range(n)) and 1 <= n < num_steps
    assert sigmas[n] < b < sigmas[n - 1]  # between two steps: the split is exact
    for s in plan.steps:  # the noisy expert runs while SNR is at most the threshold
        assert ("high_noise" in s.experts) == (n == 1 and s.index == 0 or snr(s.sigma) <= threshold)


def test_snr_mode_switches_later_with_more_shift():
    counts = [
        make_plan(T2V, shift=shift, num_steps=40, boundary="snr").counts()["high_noise"]
        for shift in (1.0, 3.0, 12.0)
    ]
    assert counts == sorted(counts)


def test_snr_mode_caps_sigma_one():
    # a grid starting at pure noise (SNR 0) measures SNR_min at the noisiest training sigma
    a = resolve_boundary("snr", release=0.875, shift=12.0, num_steps=40)
    b = resolve_boundary(
        "snr", release=0.875, shift=12.0, num_steps=40, sigmas=make_sigmas(40, 12.0, solver="dpm++")
    )
    assert 0 < a < 1 and 0 < b < 1
    assert abs(a - b) < 0.01


def test_budgets_give_exact_counts():
    plan = make_plan(T2V, shift=12.0, boundary=Budgets({"high_noise": 2, "low_noise": 6}))
    assert plan.num_steps == 8
    assert plan.counts() == {"high_noise": 2, "low_noise": 6}
    assert high_steps(plan) == [0, 1]
    plan3 = make_plan(K3, shift=5.0, boundary=Budgets({"a": 3, "b": 4, "c": 5}))
    assert plan3.counts() == {"a": 3, "b": 4, "c": 5}
    assert [s.experts[0] for s in plan3.steps] == ["a"] * 3 + ["b"] * 4 + ["c"] * 5


def line_table(slope: float, at: float, lo: float, hi: float, n: int):
    xs = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    return xs, [1.0 + slope * (x - at) for x in xs]


def test_calibrated_crossover_by_linear_interpolation():
    # high_noise loss falls with sigma, low_noise rises; their lines cross at sigma 0.63
    losses = {
        "high_noise": line_table(-1.0, 0.63, 0.0, 1.0, 11),
        "low_noise": line_table(2.0, 0.63, 0.05, 0.95, 7),  # a different sigma grid
    }
    b = resolve_boundary(Calibrated(losses), release=0.875, shift=12.0, num_steps=40)
    assert b == pytest.approx(0.63, abs=1e-9)
    plan = make_plan(T2V, shift=12.0, num_steps=40, boundary=Calibrated(losses))
    assert all(("high_noise" in s.experts) == (s.sigma >= b) for s in plan.steps)


def test_calibrated_picks_the_crossing_with_the_lowest_total_loss():
    xs = [i / 20 for i in range(21)]
    high = [1.0 - x for x in xs]
    # low_noise wins below 0.7 except for a small blip (noise) at sigma 0.6: crossings near
    # 0.598 and 0.664; the later one costs less overall
    low = [h + 0.01 if x == 0.6 else h - 0.2 if x < 0.7 else h + 0.5 for x, h in zip(xs, high)]
    (b,) = calibrated_boundaries({"high_noise": (xs, high), "low_noise": (xs, low)})
    assert b == pytest.approx(0.65 + 0.05 * 0.2 / 0.7)


def test_calibrated_three_experts():
    losses = {
        "a": line_table(-1.0, 0.7, 0.0, 1.0, 21),
        "b": line_table(0.0, 0.0, 0.0, 1.0, 21),  # flat at 1
        "c": line_table(1.0, 0.3, 0.0, 1.0, 21),
    }
    assert calibrated_boundaries(losses, ("a", "b", "c")) == pytest.approx((0.7, 0.3))


def test_plan_summary_and_json_round_trip():
    plan = make_plan(T2V, shift=12.0, num_steps=40)
    text = plan.summary()
    assert "high_noise" in text and "low_noise" in text
    assert "0-25 (26)" in text and "26-39 (14)" in text
    assert "high_noise 26, low_noise 14 (total 40)" in text
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["counts"] == {"high_noise": 26, "low_noise": 14}
    assert Plan.from_dict(d) == plan
    blend = make_plan(dataclasses.replace(T2V, band=0.05), shift=12.0, num_steps=40)
    assert "high_noise+low_noise (blend)" in blend.summary() and "4/3" in blend.summary()


BAD_INPUTS = [
    (dict(mode="release", release=1.0), "1.0"),
    (dict(mode="release", release=0.0), "outside"),
    (dict(mode="steps:0"), "got 0"),
    (dict(mode="steps:41"), "got 41"),
    (dict(mode="steps:x"), "steps:x"),
    (dict(mode="quantile"), "release, snr, steps:N, calibrated:PATH.*got 'quantile'"),
    (dict(mode="calibrated"), "loss tables"),
    (dict(mode="release", num_steps=0), "got 0"),
    (
        dict(mode=Calibrated({"high_noise": ([0, 1], [1, 1]), "mid": ([0, 1], [1, 1])})),
        "'mid'.*high_noise, low_noise",
    ),
    (
        dict(mode=Calibrated({"high_noise": ([0, 1], [1, 0]), "low_noise": ([0, 1], [2, 2])})),
        "no loss crossover",
    ),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD_INPUTS)
def test_resolve_boundary_rejects_bad_input(kwargs, match):
    kwargs = {"release": 0.875, "shift": 12.0, "num_steps": 40, **kwargs}
    mode = kwargs.pop("mode")
    with pytest.raises(ValueError, match=match):
        resolve_boundary(mode, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(boundary=Budgets({"high_noise": 0, "low_noise": 8})), "'high_noise'.*got 0"),
        (dict(boundary=Budgets({"high_noise": 2})), "every expert"),
        (dict(boundary=Budgets({"high_noise": 2, "low": 6})), "'low'.*high_noise, low_noise"),
        (dict(boundary=Budgets({"high_noise": 2, "low_noise": 6}), num_steps=10), "num_steps=10"),
        (dict(num_steps=0), "got 0"),
        (dict(num_steps=10, guidance={"high_noise": -0.5}), "-0.5"),
        (dict(num_steps=10, boundary="snr", moe=K3), "3 experts"),
        (dict(sigmas=[1.0, 0.5, 0.6, 0.0]), "descending"),
        (dict(sigmas=[1.0, 0.5, 0.1]), "exactly 0"),
        (dict(sigmas=[1.0, 0.5, 0.0], num_steps=5), "num_steps=5"),
    ],
)
def test_make_plan_rejects_bad_input(kwargs, match):
    kwargs = {"moe": T2V, "shift": 12.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_plan(kwargs.pop("moe"), **kwargs)


def test_build_plan_accepts_tensor_and_list_grids():
    sigmas = make_sigmas(8, 12.0)
    assert build_plan(sigmas, T2V) == build_plan(sigmas.tolist(), T2V)
    assert build_plan(torch.tensor([1.0, 0.5, 0.0]), T2V).counts() == {
        "high_noise": 1,
        "low_noise": 1,
    }
