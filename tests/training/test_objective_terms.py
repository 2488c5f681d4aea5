"""Optional objective terms: band training, temporal consistency, specialisation margin."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from tests.training.conftest import TINY_EXPERT, TINY_MOE
from tests.training.test_loop import _config, cache_dir  # noqa: F401 (the cache fixture)
from vidmoe.config import MoEConfig
from vidmoe.models.moe import Router
from vidmoe.models.transformer import WanTransformer
from vidmoe.training.loop import TrainConfig, train
from vidmoe.training.objective import flow_matching_loss, noisy_sample
from vidmoe.training.objective_terms import (
    ObjectiveOptions,
    edge_map,
    edge_weighted_mse,
    per_sample_mse,
    predicted_x0,
    specialisation_penalty,
    temporal_error,
)

BAND_MOE = MoEConfig(boundaries=(0.875,), guidance=(4.0, 3.0), band=0.05)


def _batch(b=4, frames=3):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(b, 4, frames, 4, 4, generator=g)
    noise = torch.randn(b, 4, frames, 4, 4, generator=g)
    context = torch.randn(b, 8, 16, generator=g)
    return x0, noise, context


def _experts(seed=0):
    torch.manual_seed(seed)
    experts = {n: WanTransformer(TINY_EXPERT) for n in TINY_MOE.expert_names}
    for e in experts.values():
        nn.init.normal_(e.head.head.weight, std=0.02)  # the zero-initialised head would hide grads
    return experts


class Offset(nn.Module):
    """The exact velocity of each sample (looked up by its x_sigma) plus a learnable offset."""

    def __init__(self, x_sigma, target, offset):
        super().__init__()
        self.x_sigma, self.target = x_sigma, target
        self.offset = nn.Parameter(torch.tensor(float(offset)))

    def forward(self, x, s, c):
        rows = [int((self.x_sigma - xi).flatten(1).abs().sum(1).argmin()) for xi in x]
        return self.target[rows] + self.offset


def _grad_sum(expert):
    return sum(float(p.grad.abs().sum()) for p in expert.parameters() if p.grad is not None)


def test_options_off_give_exactly_the_plain_loss():
    x0, noise, context = _batch(6)
    sigma = torch.tensor([0.05, 0.3, 0.86, 0.874, 0.875, 0.99])
    experts = _experts()
    # every option off, even with a band in the MoE config (sampling-only there)
    for moe in (TINY_MOE, BAND_MOE):
        out = flow_matching_loss(
            experts, moe, x0, context, sigma, noise, options=ObjectiveOptions()
        )
        x, target = noisy_sample(x0, noise, sigma)
        expect, per = 0.0, {}
        for name, idx in (("high_noise", [4, 5]), ("low_noise", [0, 1, 2, 3])):
            v = experts[name](x[idx], sigma[idx], context[idx])
            per[name] = (v - target[idx]).pow(2).flatten(1).mean(1).mean()
            expect = expect + per[name]
        assert torch.equal(out.loss, expect)  # bit-identical
        for name in per:
            assert torch.equal(out.per_expert[name], per[name])
        assert out.terms == {} and out.band_count == 0
        assert out.counts == {"high_noise": 2, "low_noise": 4}


def test_router_weights_match_route():
    router = Router(BAND_MOE)
    sigma = torch.tensor([0.0, 0.5, 0.8249, 0.83, 0.85, 0.875, 0.9, 0.92, 0.9251, 1.0])
    w = router.weights(sigma)
    for s, row in zip(sigma.tolist(), w):
        expect = dict(router.route(s))
        got = {n: float(x) for n, x in zip(BAND_MOE.expert_names, row) if x > 0}
        assert got.keys() == expect.keys(), s
        for n in got:
            assert abs(got[n] - expect[n]) < 1e-6, (s, n)
    torch.testing.assert_close(w[5], torch.tensor([0.5, 0.5], dtype=w.dtype))  # at the boundary
    assert w[0].tolist() == [0.0, 1.0] and w[-1].tolist() == [1.0, 0.0]


def test_band_sample_is_the_router_blend():
    x0, noise, context = _batch(3)
    sigma = torch.tensor([0.875, 0.9, 0.5])  # at the boundary, inside above it, outside
    x, target = noisy_sample(x0, noise, sigma)
    experts = {"high_noise": Offset(x, target, 1.0), "low_noise": Offset(x, target, -0.5)}
    opts = ObjectiveOptions(band_training=True)
    out = flow_matching_loss(experts, BAND_MOE, x0, context, sigma, noise, options=opts)
    w_high = dict(Router(BAND_MOE).route(0.9))["high_noise"]  # smoothstep(0.75) = 0.84375
    assert abs(w_high - 0.84375) < 1e-12
    blend = [0.5 - 0.5 * 0.5, w_high - 0.5 * (1 - w_high), -0.5]  # the blended offsets
    expect = torch.tensor(blend) ** 2
    torch.testing.assert_close(out.sample_loss, expect)
    assert out.band_count == 2 and out.counts == {"high_noise": 2, "low_noise": 1}
    plain = flow_matching_loss(experts, BAND_MOE, x0, context, sigma, noise)
    assert torch.equal(plain.sample_loss, torch.tensor([1.0, 1.0, 0.25]))  # hard switch


def test_band_sample_trains_both_experts_outside_only_its_owner():
    x0, noise, context = _batch(2)
    opts = ObjectiveOptions(band_training=True)
    for sigma, both in ((torch.tensor([0.87, 0.88]), True), (torch.tensor([0.95, 0.99]), False)):
        experts = _experts()
        out = flow_matching_loss(experts, BAND_MOE, x0, context, sigma, noise, options=opts)
        out.loss.backward()
        assert _grad_sum(experts["high_noise"]) > 0
        assert (_grad_sum(experts["low_noise"]) > 0) == both
        assert set(out.ran) == ({"high_noise", "low_noise"} if both else {"high_noise"})


def test_temporal_term_zero_for_oracle_and_constant_error():
    x0, noise, _ = _batch()
    sigma = torch.tensor([0.2, 0.5, 0.8, 0.95])
    x, target = noisy_sample(x0, noise, sigma)
    assert float(temporal_error(predicted_x0(x, sigma, target), x0).abs().max()) < 1e-10
    per_frame = torch.randn(4, 4, 1, 4, 4).expand_as(target)  # the same error in every frame
    constant = target + per_frame
    assert float(temporal_error(predicted_x0(x, sigma, constant), x0).abs().max()) < 1e-10
    assert float((constant - target).pow(2).mean()) > 0.5  # plain MSE does see that error
    varying = target + torch.randn(target.shape)
    assert torch.all(temporal_error(predicted_x0(x, sigma, varying), x0) > 0)


def _plain_and_with(**options):
    """A batch (2 low-noise, 2 high-noise samples) scored plain and with `options`."""
    x0, noise, context = _batch()
    sigma = torch.tensor([0.2, 0.5, 0.9, 0.95])
    experts = _experts()
    plain = flow_matching_loss(experts, TINY_MOE, x0, context, sigma, noise)
    opts = ObjectiveOptions(**options)
    out = flow_matching_loss(experts, TINY_MOE, x0, context, sigma, noise, options=opts)
    return (x0, noise, context, sigma, experts), plain, out


def test_temporal_term_counts_into_the_loss():
    (x0, *_), plain, out = _plain_and_with(temporal_weight=2.0)
    assert out.terms["temporal"] > 0
    assert out.loss.item() > plain.loss.item() + 1e-6
    torch.testing.assert_close(out.sample_loss, plain.sample_loss)  # still the velocity MSE
    with pytest.raises(ValueError, match="2 latent frames"):
        temporal_error(x0[:, :, :1], x0[:, :, :1])


def test_edge_map_marks_an_objects_outline():
    x0 = torch.zeros(2, 3, 2, 8, 8)
    x0[0, :, :, 2:6, 2:6] = 4.0  # a square in sample 0; sample 1 is flat
    edge = edge_map(x0)
    assert edge.shape == (2, 1, 2, 8, 8)
    torch.testing.assert_close(edge.flatten(1).mean(1), torch.ones(2))  # mean 1 per sample
    assert torch.all(edge[1] == 1)  # no edge: uniform weight
    assert float(edge[0, 0, 0, 0, 0]) == 0.0 and float(edge[0, 0, 0, 4, 4]) == 0.0  # flat inside
    assert float(edge[0, 0, 0, 2, 2]) > 1 and float(edge[0, 0, 0, 1, 3]) > 1  # on the outline
    err = torch.zeros(2, 3, 2, 8, 8)
    err[:, :, :, 2, 3] = 1.0  # an error on the outline
    on = edge_weighted_mse(err, torch.zeros_like(err), edge)
    assert float(on[0]) > 1.5 * float(per_sample_mse(err, torch.zeros_like(err))[0])
    torch.testing.assert_close(on[1], per_sample_mse(err, torch.zeros_like(err))[1])


def test_edge_term_counts_into_the_loss():
    (x0, noise, context, sigma, experts), plain, out = _plain_and_with(edge_weight=1.5)
    x, target = noisy_sample(x0, noise, sigma)
    pred = torch.cat(
        [
            experts[n](x[i : i + 1], sigma[i : i + 1], context[i : i + 1])
            for i, n in enumerate(["low_noise", "low_noise", "high_noise", "high_noise"])
        ]
    )
    expect = edge_weighted_mse(pred, target, edge_map(x0)).detach()  # (B,)
    assert abs(out.terms["edge"] - float(expect.mean())) < 1e-5
    want = sum((plain.sample_loss[i] + 1.5 * expect[i]).mean() for i in ([0, 1], [2, 3]))
    assert abs(out.loss.item() - float(want)) < 1e-5
    torch.testing.assert_close(out.sample_loss, plain.sample_loss)  # still the velocity MSE


def test_specialisation_penalty_values_and_gradients():
    own = torch.tensor([0.01, 0.01], requires_grad=True)
    other = torch.tensor([[1.0], [0.02]], requires_grad=True)
    p = specialisation_penalty(own, other, margin=0.05)
    torch.testing.assert_close(p, torch.tensor([0.0, 0.04]))
    p.sum().backward()
    assert own.grad.tolist() == [0.0, 1.0] and other.grad.flatten().tolist() == [0.0, -1.0]


@pytest.mark.parametrize("other_offset, active", [(1.0, False), (0.15, True)])
def test_specialisation_term_in_the_objective(other_offset, active):
    x0, noise, context = _batch(2)
    sigma = torch.tensor([0.3, 0.6])  # both owned by low_noise
    x, target = noisy_sample(x0, noise, sigma)
    experts = {"high_noise": Offset(x, target, other_offset), "low_noise": Offset(x, target, 0.1)}
    opts = ObjectiveOptions(specialisation_weight=1.0, specialisation_margin=0.05)
    out = flow_matching_loss(experts, TINY_MOE, x0, context, sigma, noise, options=opts)
    out.loss.backward()
    expect = max(0.0, 0.05 - (other_offset**2 - 0.1**2))  # owner MSE 0.01
    assert abs(out.terms["specialisation"] - expect) < 1e-6
    assert (out.terms["specialisation"] > 0) == active
    assert set(out.ran) == {"high_noise", "low_noise"}
    assert abs(out.loss.item() - (0.01 + expect)) < 1e-6
    high = experts["high_noise"].offset.grad
    assert (high is not None and float(high) != 0.0) == active  # the non-owner is pushed away
    assert float(experts["low_noise"].offset.grad) != 0.0


@pytest.mark.parametrize(
    "options",
    [
        {"band_training": True, "moe": {"boundaries": [0.875], "guidance": [4, 3], "band": 0.05}},
        {"temporal_weight": 1.0},
        {"edge_weight": 1.0},
        {"specialisation_weight": 0.5},
    ],
)
def test_each_option_trains_end_to_end(cache_dir, tmp_path, options):  # noqa: F811
    cfg = TrainConfig.from_dict(_config(cache_dir, tmp_path, max_steps=2, log_every=1, **options))
    trainer = train(cfg)
    records = [json.loads(ln) for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert trainer.step == 2 and [r["step"] for r in records] == [1, 2]
    for r in records:
        assert all(v == v and v >= 0 for v in r["loss"].values())  # finite, not NaN
        assert sum(r["count"].values()) == cfg.batch_size
        if "temporal_weight" in options:
            assert r["terms"]["temporal"] > 0
        if "edge_weight" in options:
            assert set(r["terms"]) == {"edge"} and r["terms"]["edge"] > 0
        if "specialisation_weight" in options:
            assert set(r["terms"]) == {"specialisation"} and set(r["grad_norm"]) == set(
                cfg.moe.expert_names
            )  # every expert ran, so every expert is clipped
        if "band_training" in options:
            assert "band_count" in r and "terms" not in r


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="band_training needs a transition band"):
        TrainConfig.from_dict(_config("c", "o", band_training=True))
    x0, noise, context = _batch(2)
    with pytest.raises(ValueError, match="moe.band = 0"):
        flow_matching_loss(
            _experts(),
            TINY_MOE,
            x0,
            context,
            torch.tensor([0.5, 0.9]),
            noise,
            options=ObjectiveOptions(band_training=True),
        )
    band_moe = {"boundaries": [0.875], "guidance": [4, 3], "band": 0.05}
    for opt in ({"band_training": True, "moe": band_moe}, {"specialisation_weight": 0.1}):
        with pytest.raises(ValueError, match="needs every expert in one run"):
            TrainConfig.from_dict(_config("c", "o", experts=["low_noise"], **opt))
    with pytest.raises(ValueError, match="temporal_weight must be >= 0"):
        TrainConfig.from_dict(_config("c", "o", temporal_weight=-1.0))
    with pytest.raises(ValueError, match="edge_weight must be >= 0"):
        TrainConfig.from_dict(_config("c", "o", edge_weight=-0.5))
    only_low = {"low_noise": _experts()["low_noise"]}
    with pytest.raises(ValueError, match="cannot train a subset"):
        flow_matching_loss(
            only_low,
            TINY_MOE,
            x0,
            context,
            torch.tensor([0.1, 0.2]),
            noise,
            options=ObjectiveOptions(specialisation_weight=1.0),
        )


def test_terms_ablation_runs_differ_from_moe2_by_their_option_only(monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "ablations.py"
    spec = importlib.util.spec_from_file_location("ablations", path)
    ablations = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "ablations", ablations)  # for its dataclasses
    spec.loader.exec_module(ablations)
    root, cache = Path("runs"), Path("cache")
    base = ablations.train_config(ablations.RUNS["moe2"], root, cache)
    changed = {}
    for name in ablations.ABLATIONS["terms"]:
        cfg = ablations.train_config(ablations.RUNS[name], root, cache)
        changed[name] = {
            f
            for f in cfg.__dataclass_fields__
            if f != "out_dir" and getattr(cfg, f) != getattr(base, f)
        }
    assert changed == {
        "moe2": set(),
        "moe2_band": {"moe", "band_training"},
        "moe2_temporal": {"temporal_weight"},
        "moe2_spec": {"specialisation_weight"},
    }
    band = ablations.train_config(ablations.RUNS["moe2_band"], root, cache)
    assert band.moe.band == 0.05 and band.objective_options.band_training
