"""The noise-level router and `Experts`, the one owner of the expert networks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from vidmoe.config import MoEConfig
from vidmoe.models.moe import RESIDENCY, Experts, Placement, Router, smoothstep
from vidmoe.presets import TINY_TRANSFORMER

T2V = MoEConfig(boundaries=(0.875,), guidance=(4.0, 3.0))
K3 = MoEConfig(expert_names=("a", "b", "c"), boundaries=(0.8, 0.4), guidance=(5.0, 4.0, 3.0))


def weight_of(router: Router, name: str, sigma: float) -> float:
    return dict(router.route(sigma)).get(name, 0.0)


def test_hard_switch_exactly_at_boundary():
    router = Router(T2V)
    assert router.route(0.875) == (("high_noise", 1.0),)
    assert router.route(0.875 - 1e-9) == (("low_noise", 1.0),)
    assert router.route(1.0) == (("high_noise", 1.0),)
    assert router.route(0.0) == (("low_noise", 1.0),)


def test_release_rule_timestep_at_or_above_boundary_times_1000():
    router = Router(T2V)
    for i in range(1001):
        sigma = i / 1000
        expected = "high_noise" if 1000 * sigma >= 875 else "low_noise"
        assert router.owner(sigma) == expected


def test_three_experts_route_by_interval():
    router = Router(K3)
    cases = {1.0: "a", 0.8: "a", 0.79: "b", 0.4: "b", 0.39: "c", 0.0: "c"}
    for sigma, name in cases.items():
        assert router.route(sigma) == ((name, 1.0),)


def test_assign_matches_owner_per_sample():
    router = Router(K3)
    sigma = torch.linspace(0, 1, 101)
    idx = router.assign(sigma)
    assert idx.tolist() == [router.index(float(s)) for s in sigma]


def test_single_expert_owns_everything():
    router = Router(MoEConfig(expert_names=("dense",), boundaries=(), guidance=(5.0,)))
    assert all(router.route(s / 10) == (("dense", 1.0),) for s in range(11))


def test_band_weights_sum_to_one_and_blend_only_inside():
    band = 0.05
    router = Router(dataclasses.replace(T2V, band=band))
    for i in range(2001):
        sigma = i / 2000
        pairs = router.route(sigma)
        assert sum(w for _, w in pairs) == pytest.approx(1.0, abs=1e-12)
        assert all(0 < w <= 1 for _, w in pairs)
        inside = 0.875 - band < sigma < 0.875 + band
        assert (len(pairs) == 2) == inside
        if len(pairs) == 2:
            assert [n for n, _ in pairs] == ["high_noise", "low_noise"]  # noisiest first


def test_band_ramp_is_smooth_and_monotone():
    b, band = 0.875, 0.05
    router = Router(dataclasses.replace(T2V, band=band))
    assert weight_of(router, "high_noise", b) == pytest.approx(0.5)
    assert weight_of(router, "high_noise", b + band) == 1.0
    assert weight_of(router, "high_noise", b - band) == 0.0
    dx = 1e-4
    xs = [b - 2 * band + i * dx for i in range(int(4 * band / dx))]
    ws = [weight_of(router, "high_noise", x) for x in xs]
    assert all(w1 <= w2 for w1, w2 in zip(ws, ws[1:]))  # monotone in sigma
    # Lipschitz (no jumps): smoothstep's steepest slope is 1.5 / (2 * band)
    assert max(w2 - w1 for w1, w2 in zip(ws, ws[1:])) <= 1.5 / (2 * band) * dx * (1 + 1e-6)
    h = 1e-5
    # C1: the slope vanishes at both ends of the band
    for edge in (b - band, b + band):
        slope = weight_of(router, "high_noise", edge + h) - weight_of(
            router, "high_noise", edge - h
        )
        assert abs(slope / (2 * h)) < 1e-2  # vs a peak slope of 15


def test_band_reduces_to_hard_switch_as_band_goes_to_zero():
    hard = Router(T2V)
    for sigma in (0.87, 0.874, 0.876, 0.88):
        gaps = []
        for band in (0.1, 0.01, 0.001, 0.0):
            soft = Router(dataclasses.replace(T2V, band=band))
            gaps.append(
                abs(weight_of(soft, "high_noise", sigma) - weight_of(hard, "high_noise", sigma))
            )
        assert gaps[-1] == 0.0 and gaps[-2] == 0.0  # band below |sigma - b|: identical routes
        assert gaps == sorted(gaps, reverse=True)


def test_smoothstep_ends():
    assert smoothstep(-1.0) == 0.0 and smoothstep(0.0) == 0.0
    assert smoothstep(0.5) == 0.5 and smoothstep(1.0) == 1.0 and smoothstep(2.0) == 1.0


def test_smoothstep_of_a_tensor_is_the_float_form_elementwise():
    xs = [-0.5, 0.0, 0.1, 0.25, 0.5, 0.9, 1.0, 1.5]
    got = smoothstep(torch.tensor(xs, dtype=torch.float64)).tolist()
    assert got == [smoothstep(x) for x in xs]


def test_batched_weights_match_route_inside_and_outside_bands():
    router = Router(dataclasses.replace(T2V, band=0.05))
    sigmas = [0.0, 0.3, 0.83, 0.85, 0.875, 0.9, 0.92, 1.0]
    w = router.weights(torch.tensor(sigmas, dtype=torch.float64))  # (8, 2)
    for row, sigma in zip(w.tolist(), sigmas):
        assert row == pytest.approx([weight_of(router, n, sigma) for n in T2V.expert_names], abs=0)


@pytest.mark.parametrize(
    ("moe", "match"),
    [
        (MoEConfig(boundaries=(1.2,)), "1.2"),
        (MoEConfig(boundaries=(0.0,)), "outside"),
        (dataclasses.replace(K3, boundaries=(0.4, 0.8)), "descending"),
        (dataclasses.replace(K3, boundaries=(0.5, 0.5)), "descending"),
        (dataclasses.replace(K3, boundaries=(0.7, 0.5), band=0.15), "overlap.*0.1"),
        (dataclasses.replace(T2V, band=0.2), "past sigma 0 or 1"),
        (dataclasses.replace(T2V, band=-0.1), "-0.1"),
        (MoEConfig(expert_names=("x", "x"), boundaries=(0.5,), guidance=(1.0, 1.0)), "unique"),
        (MoEConfig(guidance=(-1.0, 3.0)), "-1.0"),
    ],
)
def test_bad_configs_raise_clear_errors(moe, match):
    with pytest.raises(ValueError, match=match):
        Router(moe)


def test_touching_bands_are_accepted():
    Router(dataclasses.replace(K3, band=0.2))  # 0.8 - 0.2 == 0.4 + 0.2


def test_route_rejects_sigma_outside_unit_interval():
    with pytest.raises(ValueError, match="1.5"):
        Router(T2V).route(1.5)


class Stub(nn.Module):
    """A stand-in expert with a config."""

    def __init__(self, config=TINY_TRANSFORMER, width: int = 4):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(width, width)


def test_experts_keyed_by_name_and_param_counts():
    high, low = Stub(), Stub(width=6)
    moe = Experts({"low_noise": low, "high_noise": high}, T2V)
    assert list(moe) == ["high_noise", "low_noise"]  # ordered noisiest first
    assert list(moe.keys()) == ["high_noise", "low_noise"] and len(moe) == 2
    assert moe["high_noise"] is high and dict(moe.items())["low_noise"] is low
    assert "low_noise" in moe and "medium" not in moe
    assert list(moe.values()) == [high, low]
    counts = moe.param_counts()
    assert counts.per_expert == {"high_noise": 20, "low_noise": 42}
    assert counts.total == 62
    assert counts.active == 42


def test_shared_parameters_are_counted_once():
    high, low = Stub(), Stub()
    low.proj = high.proj
    counts = Experts({"high_noise": high, "low_noise": low}, T2V).param_counts()
    assert counts.total == 20 and counts.active == 20


def test_expert_names_must_match_config():
    with pytest.raises(ValueError, match=r"missing \['high_noise'\], unknown \['high'\]"):
        Experts({"high": Stub(), "low_noise": Stub()}, T2V)
    moe = Experts({"high_noise": Stub(), "low_noise": Stub()}, T2V)
    with pytest.raises(ValueError, match="experts: high_noise, low_noise"):
        moe["medium"]


def test_check_compatible():
    same = Experts({"high_noise": Stub(), "low_noise": Stub()}, T2V)
    same.check_compatible(strict=True)

    wider = dataclasses.replace(TINY_TRANSFORMER, ffn_dim=384)
    ffn = Experts({"high_noise": Stub(), "low_noise": Stub(wider)}, T2V)
    ffn.check_compatible()  # training experts may differ in FFN width
    with pytest.raises(ValueError, match="ffn_dim: high_noise=192, low_noise=384"):
        ffn.check_compatible(strict=True)

    i2v = dataclasses.replace(TINY_TRANSFORMER, model_type="i2v", in_dim=36)
    bad = Experts({"high_noise": Stub(), "low_noise": Stub(i2v)}, T2V)
    with pytest.raises(ValueError, match="model_type.*in_dim"):
        bad.check_compatible()

    bare = Stub()
    del bare.config
    with pytest.raises(ValueError, match="no `.config`"):
        Experts({"high_noise": Stub(), "low_noise": bare}, T2V).check_compatible()


def test_sigma_range_is_the_set_of_sigmas_each_expert_owns():
    moe, router = K3, Router(K3)
    for sigma in [i / 200 for i in range(201)] + [0.4, 0.8]:
        owners = [
            n
            for n in moe.expert_names
            if router.sigma_range(n)[0] <= sigma < router.sigma_range(n)[1]
        ]
        assert owners == [router.owner(sigma)], sigma
    with pytest.raises(ValueError, match="unknown expert 'd'"):
        router.sigma_range("d")


def test_resident_experts_sit_on_the_device_and_activate_returns_them():
    high, low = Stub(), Stub()
    experts = Experts(
        {"high_noise": high, "low_noise": low},
        T2V,
        placement=Placement(device="meta", dtype=torch.float16),
    )
    assert all(p.is_meta for e in experts.values() for p in e.parameters())
    assert experts.activate("low_noise") is low and experts.device == torch.device("meta")
    assert experts.dtype == torch.float16 and experts.router.owner(0.9) == "high_noise"


def test_swap_moves_the_active_expert_in_and_the_others_out():
    experts = Experts(
        {"high_noise": Stub(), "low_noise": Stub()},
        T2V,
        placement=Placement(device="cpu", residency="swap"),
    )
    assert experts.on_device() == ()  # placed in host RAM where the loader put them
    assert experts.activate("high_noise") is experts["high_noise"]
    experts.activate("low_noise")
    assert experts.on_device() == ("low_noise",)
    assert experts.policy.log == [
        ("high_noise", "upload"),
        ("high_noise", "evict"),
        ("low_noise", "upload"),
    ]
    resident = Experts({"high_noise": Stub(), "low_noise": Stub()}, T2V)
    resident.activate("high_noise")
    assert resident.on_device() == ("high_noise", "low_noise") and resident.policy.log == []
    with pytest.raises(ValueError, match="unknown expert 'mid'"):
        experts.activate("mid")


def test_placement_refuses_an_unknown_residency():
    assert set(RESIDENCY) == {"resident", "swap", "disk", "blocks"}
    with pytest.raises(
        ValueError, match="residency must be one of resident, swap, disk, blocks; got 'ram'"
    ):
        Placement(residency="ram")
