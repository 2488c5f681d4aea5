"""The flow-matching objective: oracle loss, routing of samples to experts, sigma sampling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.training.conftest import TINY_EXPERT, TINY_MOE
from vidmoe.models.transformer import WanTransformer
from vidmoe.training.objective import (
    assign_experts,
    flow_matching_loss,
    noisy_sample,
    sample_sigma,
)


def _batch(b=6):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(b, 4, 2, 4, 4, generator=g)
    noise = torch.randn(b, 4, 2, 4, 4, generator=g)
    context = torch.randn(b, 8, 16, generator=g)
    return x0, noise, context


def test_oracle_velocity_has_zero_loss():
    x0, noise, context = _batch()
    sigma = torch.tensor([0.05, 0.3, 0.6, 0.874, 0.875, 0.99])
    x_sigma, target = noisy_sample(x0, noise, sigma)

    class Exact(nn.Module):
        def forward(self, x, s, c):  # look the sample up by its x_sigma: the true velocity
            rows = [int(((x_sigma - xi).flatten(1).abs().sum(1)).argmin()) for xi in x]
            return target[rows]

    out = flow_matching_loss(
        {"high_noise": Exact(), "low_noise": Exact()}, TINY_MOE, x0, context, sigma, noise
    )
    assert float(out.loss) == 0.0
    assert out.counts == {"high_noise": 2, "low_noise": 4}
    assert torch.all(out.sample_loss == 0)


def test_path_endpoints_and_velocity():
    x0, noise, _ = _batch(2)
    x, v = noisy_sample(x0, noise, torch.tensor([0.0, 1.0]))
    assert torch.equal(x[0], x0[0]) and torch.equal(x[1], noise[1])
    assert torch.equal(v, noise - x0)


def test_samples_reach_only_their_expert():
    torch.manual_seed(0)
    experts = {n: WanTransformer(TINY_EXPERT) for n in TINY_MOE.expert_names}
    for e in experts.values():
        nn.init.normal_(e.head.head.weight, std=0.02)  # the zero-initialised head would hide grads
    x0, noise, context = _batch(4)
    sigma = torch.tensor([0.9, 0.95, 0.88, 0.999])  # all >= 0.875: high noise only
    out = flow_matching_loss(experts, TINY_MOE, x0, context, sigma, noise)
    out.loss.backward()
    assert out.counts == {"high_noise": 4, "low_noise": 0}
    assert set(out.per_expert) == {"high_noise"}
    high = [p.grad for p in experts["high_noise"].parameters()]
    low = [p.grad for p in experts["low_noise"].parameters()]
    assert all(g is not None for g in high) and any(float(g.abs().sum()) > 0 for g in high)
    assert all(g is None or not g.any() for g in low)


def test_mixed_batch_routes_by_boundary():
    sigma = torch.tensor([0.0, 0.5, 0.8749, 0.875, 1.0])
    assert assign_experts(sigma, TINY_MOE).tolist() == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("kind", ["uniform", "logit_normal"])
def test_sample_sigma_range_and_shift(kind):
    g = torch.Generator().manual_seed(0)
    plain = sample_sigma(4000, kind=kind, generator=g)
    g = torch.Generator().manual_seed(0)
    shifted = sample_sigma(4000, kind=kind, shift=3.0, generator=g)
    assert plain.min() >= 0 and plain.max() <= 1 and shifted.max() <= 1
    assert torch.all(shifted >= plain)  # shift > 1 moves every draw to higher noise
    assert float(shifted.mean()) > float(plain.mean()) + 0.1


def test_sample_sigma_rejects_unknown_kind():
    with pytest.raises(ValueError, match="uniform"):
        sample_sigma(4, kind="cosine")


def test_loss_table_feeds_calibrated_boundaries():
    from vidmoe.sampling.boundary import calibrated_boundaries
    from vidmoe.training.objective import loss_table

    x0, _, context = _batch(4)

    class Erring(nn.Module):
        """The exact velocity (x - x0) / sigma plus an error that depends on sigma."""

        def __init__(self, error):
            super().__init__()
            self.error = error

        def forward(self, x, s, c):
            s = s.view(-1, 1, 1, 1, 1)
            return (x - x0) / s + self.error(s)

    sigmas = [0.1 * i for i in range(1, 10)]
    tables = {
        "high_noise": loss_table(Erring(lambda s: 1 - s), x0, context, sigmas),  # good at high
        "low_noise": loss_table(Erring(lambda s: s), x0, context, sigmas),  # good at low
    }
    assert tables["high_noise"][0] == sigmas
    torch.testing.assert_close(torch.tensor(tables["low_noise"][1]), torch.tensor(sigmas) ** 2)
    (b,) = calibrated_boundaries(tables)
    assert abs(b - 0.5) < 1e-6


def test_sample_sigma_within_ranges_is_the_conditioned_draw():
    from vidmoe.config import MoEConfig
    from vidmoe.training.objective import expert_ranges

    moe = MoEConfig(boundaries=(0.875,))
    (high,) = expert_ranges(moe, ["high_noise"])
    g = torch.Generator().manual_seed(0)
    sigma = sample_sigma(2000, shift=3.0, generator=g, ranges=[high])
    assert sigma.shape == (2000,) and float(sigma.min()) >= 0.875 and float(sigma.max()) <= 1.0
    # the conditioned draw keeps the shape of the full one: its median within [0.875, 1]
    full = sample_sigma(200_000, shift=3.0, generator=torch.Generator().manual_seed(1))
    full = full[full >= 0.875]
    assert abs(float(sigma.median()) - float(full.median())) < 0.005
    (low,) = expert_ranges(moe, ["low_noise"])
    assert float(sample_sigma(500, generator=g, ranges=[low]).max()) < 0.875
    with pytest.raises(ValueError, match="unknown experts"):
        expert_ranges(moe, ["mid_noise"])


def test_a_subset_of_experts_trains_only_its_own_range():
    x0, noise, context = _batch(4)
    torch.manual_seed(0)
    only_low = {"low_noise": WanTransformer(TINY_EXPERT)}
    out = flow_matching_loss(
        only_low, TINY_MOE, x0, context, torch.tensor([0.1, 0.2, 0.5, 0.8]), noise
    )
    assert out.counts == {"low_noise": 4} and out.loss.item() > 0
    with pytest.raises(ValueError, match=r"experts \['high_noise'\].*only \['low_noise'\]"):
        flow_matching_loss(
            only_low, TINY_MOE, x0, context, torch.tensor([0.1, 0.2, 0.5, 0.9]), noise
        )
