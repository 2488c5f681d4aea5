"""The step cache: threshold 0 is the uncached expert bit for bit; a loose threshold skips
steps by reusing the cached residual; shape changes and resets never reuse a stale residual."""

import pytest
import torch

from vidmoe.config import TransformerConfig
from vidmoe.models.step_cache import StepCache
from vidmoe.models.transformer import WanTransformer

CFG = TransformerConfig(dim=64, num_heads=2, ffn_dim=96, num_layers=3, text_dim=16, freq_dim=32)


@pytest.fixture(scope="module")
def expert():
    torch.manual_seed(0)
    expert = WanTransformer(CFG).eval()
    torch.nn.init.normal_(expert.head.head.weight, std=0.02)  # the release init zeroes it
    return expert


def inputs(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CFG.in_dim, 2, 4, 4, generator=g)
    return x, [torch.randn(5, CFG.text_dim, generator=g) for _ in range(batch)]


@torch.no_grad()
def test_threshold_zero_is_the_uncached_expert(expert):
    x, ctx = inputs()
    cache = StepCache(threshold=0.0)
    for sigma in (0.9, 0.8, 0.7):
        assert torch.equal(
            expert(x, torch.tensor([sigma]), ctx, cache=cache),
            expert(x, torch.tensor([sigma]), ctx),
        )
    assert cache.skipped == 0


@torch.no_grad()
def test_small_change_reuses_the_rest_of_the_stack_and_max_skips_forces_a_full_step(expert):
    x, ctx = inputs()
    calls = []
    hook = expert.blocks[2].register_forward_hook(lambda *a: calls.append(1))
    cache = StepCache(threshold=1.0, max_skips=2)
    outs = [
        expert(x, torch.tensor([s]), ctx, cache=cache) for s in (0.9, 0.899, 0.898, 0.897, 0.896)
    ]
    hook.remove()
    # step 1 full (warm-up), 2-3 cached, 4 forced full (max_skips), 5 cached
    assert cache.skipped == 3 and len(calls) == 2
    full = expert(x, torch.tensor([0.899]), ctx)
    err = ((outs[1] - full).norm() / full.norm()).item()
    assert 0 < err < 0.05  # an approximation, close because sigma barely moved
    assert cache.changes[0] != cache.changes[0] and all(c < 1.0 for c in cache.changes[1:])


@torch.no_grad()
def test_shape_change_and_reset_never_reuse_a_stale_residual(expert):
    cache = StepCache(threshold=10.0)
    x1, c1 = inputs(1)
    x2, c2 = inputs(2)
    expert(x1, torch.tensor([0.9]), c1, cache=cache)
    out = expert(x2, torch.tensor([0.9, 0.9]), c2, cache=cache)  # cond+uncond batch: new shape
    assert cache.skipped == 0 and torch.equal(out, expert(x2, torch.tensor([0.9, 0.9]), c2))
    cache.reset()
    expert(x2, torch.tensor([0.9, 0.9]), c2, cache=cache)
    assert cache.skipped == 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="threshold must be a number >= 0; got nan"):
        StepCache(threshold=float("nan"))
    with pytest.raises(ValueError, match="warmup >= 1"):
        StepCache(threshold=0.1, warmup=0)
