"""Classifier-free guidance and the cond+uncond batch."""

from __future__ import annotations

import pytest
import torch

from vidmoe.sampling.guidance import apply_guidance, cfg_batch, split_cfg_batch, uses_uncond


def pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 3, 5, 6, generator=g), torch.randn(2, 4, 3, 5, 6, generator=g)


def test_scale_one_returns_cond_exactly():
    cond, uncond = pair()
    out = apply_guidance(cond, uncond, 1.0)
    assert torch.equal(out, cond)
    assert not uses_uncond(1.0) and uses_uncond(3.0)


def test_scale_zero_returns_uncond_and_formula_holds():
    cond, uncond = pair(1)
    assert torch.equal(apply_guidance(cond, uncond, 0.0), uncond)
    for scale in (0.5, 3.0, 4.0):
        expected = uncond + scale * (cond - uncond)
        assert torch.equal(apply_guidance(cond, uncond, scale), expected)
        # linear in the scale: the guided velocity extrapolates along cond - uncond
        assert torch.allclose(apply_guidance(cond, uncond, scale) - uncond, scale * (cond - uncond))


def test_batch_round_trip():
    cond, uncond = pair(2)
    batch = cfg_batch(cond, uncond)
    assert batch.shape == (4, 4, 3, 5, 6)
    c, u = split_cfg_batch(batch)
    assert torch.equal(c, cond) and torch.equal(u, uncond)


def test_bad_inputs():
    cond, uncond = pair()
    with pytest.raises(ValueError, match="-1"):
        apply_guidance(cond, uncond, -1.0)
    with pytest.raises(ValueError, match="same shape"):
        apply_guidance(cond, uncond[:1], 2.0)
    with pytest.raises(ValueError, match="same shape"):
        cfg_batch(cond, uncond[:1])
    with pytest.raises(ValueError, match="even batch size; got 3"):
        split_cfg_batch(torch.zeros(3, 2))


def test_guided_velocity_batches_cond_and_uncond_as_two_separate_calls_would():
    from vidmoe.sampling.guidance import guided_velocity

    calls = []

    def model(x, sigma, context, y=None):  # (B, C, F, H, W) -> same; depends on each context
        calls.append(x.shape[0])
        shift = torch.stack([c.mean() for c in context]).view(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1)
        return x * sigma.view(-1, 1, 1, 1, 1) + shift + (0 if y is None else y)

    x, sigma = torch.randn(1, 2, 3, 4, 4), torch.tensor([0.7])
    cond, uncond, y = [torch.randn(5, 8)], [torch.randn(3, 8)], torch.randn(1, 2, 3, 4, 4)
    want = apply_guidance(model(x, sigma, cond, y=y), model(x, sigma, uncond, y=y), 4.0)
    calls.clear()
    got = guided_velocity(model, x, sigma, cond, uncond, 4.0, y=y)
    assert calls == [2] and torch.equal(got, want)  # one pass of batch 2, the same numbers
    calls.clear()
    assert torch.equal(guided_velocity(model, x, sigma, cond, uncond, 1.0), model(x, sigma, cond))
    assert calls == [1, 1]  # guidance 1: the conditional pass alone (then the check's own call)
