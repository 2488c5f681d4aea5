"""Adapters on one expert: unfused = merged weights, stacking adds deltas, strengths change
without reloading, fuse/unfuse is bit-exact, the release names stay the state_dict's names."""

import copy

import pytest
import torch

from vidmoe.models import lora
from vidmoe.models.lora import AdapterWeights
from vidmoe.models.transformer import WanTransformer
from vidmoe.presets import TINY_TRANSFORMER

CFG = TINY_TRANSFORMER


@pytest.fixture
def expert():
    torch.manual_seed(0)
    m = WanTransformer(CFG).eval().requires_grad_(False)
    torch.nn.init.normal_(m.head.head.weight, std=0.02)
    return m


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, CFG.in_dim, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 5, CFG.text_dim, generator=g)
    return x, torch.tensor([0.7]), ctx


def random_adapter(model, seed, *, rank=3, scale=0.5, diff=False):
    """LoRA on every linear of block 0, the head and the patch embedding; optional norm/weight deltas."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    names = [n for n in mods if n.startswith("blocks.0.") and isinstance(mods[n], torch.nn.Linear)]
    out = {}
    for n in [*names, "head.head", "patch_embedding"]:
        w = mods[n].weight
        out[n] = AdapterWeights(
            down=torch.randn(rank, *w.shape[1:], generator=g) * 0.1,
            up=torch.randn(w.shape[0], rank, generator=g) * 0.1,
            scale=scale,
        )
    if diff:
        for n in ("blocks.1.modulation", "head.modulation"):  # bare parameters: .diff only
            out[n] = AdapterWeights(
                diff=torch.randn(model.get_parameter(n).shape, generator=g) * 0.05
            )
        for n in ("blocks.1.self_attn.q", "blocks.1.norm3", "blocks.1.self_attn.norm_q"):
            w = mods[n].weight
            b = getattr(mods[n], "bias", None)
            out[n] = AdapterWeights(
                diff=torch.randn(w.shape, generator=g) * 0.05,
                diff_b=None if b is None else torch.randn(b.shape, generator=g) * 0.05,
            )
    return out


def merged(model, adapters_and_strengths):
    """A copy of `model` with the deltas merged by hand (the reference)."""
    ref = copy.deepcopy(model)
    lora.remove_adapter(ref) if lora.adapter_strengths(ref) else None
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for weights, s in adapters_and_strengths:
            for n, w in weights.items():
                if n not in mods:  # a bare parameter
                    ref.get_parameter(n).add_(s * w.diff)
                    continue
                m = mods[n]
                if w.down is not None:
                    delta = (w.up.flatten(1) @ w.down.flatten(1)).reshape(m.weight.shape) * w.scale
                    m.weight += s * delta
                if w.diff is not None:
                    m.weight += s * w.diff
                if w.diff_b is not None:
                    m.bias += s * w.diff_b
    return ref


def test_unfused_equals_merged_weights_and_stacking_adds_deltas(expert):
    a, b = random_adapter(expert, 1, diff=True), random_adapter(expert, 2, scale=2.0)
    x, t, ctx = inputs()
    base = expert(x, t, ctx)
    original = {k: v.clone() for k, v in expert.state_dict().items()}
    lora.add_adapter(expert, "a", a, strength=0.7)
    lora.add_adapter(expert, "b", b, strength=-0.4)
    out = expert(x, t, ctx)
    # the bare-parameter deltas were undone after the call, bit for bit
    assert all(torch.equal(v, original[k]) for k, v in expert.state_dict().items())
    ref = merged(expert, [(a, 0.7), (b, -0.4)])(x, t, ctx)
    assert (out - base).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_strength_changes_without_reloading_and_zero_is_exactly_base(expert):
    a = random_adapter(expert, 1)
    x, t, ctx = inputs()
    base = expert(x, t, ctx)
    lora.add_adapter(expert, "a", a)
    full = expert(x, t, ctx)
    lora.set_strengths(expert, {"a": 0.0})
    assert torch.equal(expert(x, t, ctx), base)
    lora.set_strengths(expert, {"a": 0.5})
    half = expert(x, t, ctx)
    torch.testing.assert_close(half, merged(expert, [(a, 0.5)])(x, t, ctx), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(half, full)


def test_fused_matches_unfused_and_unfuse_is_bit_exact(expert):
    original = {k: v.clone() for k, v in expert.state_dict().items()}
    lora.add_adapter(expert, "a", random_adapter(expert, 1, diff=True), strength=0.8)
    lora.add_adapter(expert, "b", random_adapter(expert, 2), strength=1.3)
    x, t, ctx = inputs()
    unfused = expert(x, t, ctx)
    lora.fuse(expert)
    assert lora.is_fused(expert)
    torch.testing.assert_close(expert(x, t, ctx), unfused, atol=1e-5, rtol=1e-5)
    changed = [k for k, v in expert.state_dict().items() if not torch.equal(v, original[k])]
    assert {"blocks.0.self_attn.q.weight", "blocks.1.norm3.bias", "blocks.1.modulation"} <= set(
        changed
    )
    lora.unfuse(expert)
    assert all(torch.equal(v, original[k]) for k, v in expert.state_dict().items())
    torch.testing.assert_close(expert(x, t, ctx), unfused, atol=0, rtol=0)  # unfused again


def test_fused_strength_is_fixed_until_unfused(expert):
    lora.add_adapter(expert, "a", random_adapter(expert, 1), strength=0.8)
    lora.fuse(expert)
    lora.set_strengths(expert, {"a": 0.8})  # the same value is fine
    with pytest.raises(ValueError, match="fused at strength 0.8"):
        lora.set_strengths(expert, {"a": 0.5})
    lora.unfuse(expert)
    lora.set_strengths(expert, {"a": 0.5})


def test_remove_restores_base_and_keeps_other_fused_adapters(expert):
    original = {k: v.clone() for k, v in expert.state_dict().items()}
    x, t, ctx = inputs()
    base = expert(x, t, ctx)
    a, b = random_adapter(expert, 1), random_adapter(expert, 2)
    lora.add_adapter(expert, "a", a)
    lora.add_adapter(expert, "b", b)
    lora.fuse(expert)
    lora.remove_adapter(expert, "a")
    assert lora.is_fused(expert) and lora.adapter_strengths(expert) == {"b": 1.0}
    torch.testing.assert_close(
        expert(x, t, ctx), merged(expert, [(b, 1.0)])(x, t, ctx), atol=1e-5, rtol=1e-5
    )
    lora.remove_adapter(expert)
    assert all(torch.equal(v, original[k]) for k, v in expert.state_dict().items())
    assert torch.equal(expert(x, t, ctx), base)
    assert not any(n.endswith(lora.STACK_NAME) for n, _ in expert.named_modules())


def test_release_names_stay_and_adapters_follow_the_module(expert):
    names = list(expert.state_dict())
    lora.add_adapter(expert, "a", random_adapter(expert, 1))
    assert list(expert.state_dict()) == names  # adapter tensors are non-persistent buffers
    assert any(n.endswith("lora_adapters.adapters.a.down") for n, _ in expert.named_buffers())
    expert.to(torch.float64)  # `.to` carries the adapters along (as it would to another device)
    x, t, ctx = inputs()
    out = expert(x.double(), t, ctx.double())
    assert out.dtype == torch.float32  # the head returns float32; the adapters ran in float64
    buf = dict(expert.named_buffers())["blocks.0.self_attn.q.lora_adapters.adapters.a.down"]
    assert buf.dtype == torch.float64
    fresh = WanTransformer(CFG)
    fresh.load_state_dict(expert.state_dict())  # the base weights load by their release names


@pytest.mark.parametrize(
    "bad, match",
    [
        (
            AdapterWeights(down=torch.zeros(3, 96), up=torch.zeros(96, 4)),
            "rank 3 .* rank 4 .* disagree",
        ),
        (AdapterWeights(down=torch.zeros(3, 64), up=torch.zeros(96, 3)), "another model"),
        (
            AdapterWeights(diff=torch.zeros(96, 64)),
            r"\(96, 64\) but the model's tensor is \(96, 96\)",
        ),
        (AdapterWeights(down=torch.zeros(3, 96)), "both A"),
    ],
)
def test_bad_adapters_are_refused(expert, bad, match):
    with pytest.raises(ValueError, match=match):
        lora.add_adapter(expert, "bad", {"blocks.0.self_attn.q": bad})
    assert lora.adapter_strengths(expert) == {}


def test_bare_parameters_take_only_a_diff(expert):
    with pytest.raises(ValueError, match="bare parameter; only a .diff"):
        lora.add_adapter(
            expert, "a", {"blocks.0.modulation": AdapterWeights(diff_b=torch.zeros(96))}
        )
    with pytest.raises(ValueError, match=r"\(1, 6, 5120\) but the model's tensor is \(1, 6, 96\)"):
        lora.add_adapter(
            expert, "a", {"blocks.0.modulation": AdapterWeights(diff=torch.zeros(1, 6, 5120))}
        )
    assert "blocks.0.modulation" in lora.adaptable_modules(expert)


def test_other_errors(expert):
    with pytest.raises(ValueError, match="no such module"):
        lora.add_adapter(
            expert, "a", {"blocks.9.self_attn.q": AdapterWeights(diff=torch.zeros(96, 96))}
        )
    lora.add_adapter(
        expert, "a", {"blocks.0.self_attn.q": AdapterWeights(diff=torch.zeros(96, 96))}
    )
    with pytest.raises(ValueError, match="already attached"):
        lora.add_adapter(expert, "a", {})
    with pytest.raises(ValueError, match="finite number; got 'x'"):
        lora.set_strengths(expert, {"a": "x"})
    with pytest.raises(ValueError, match="no adapter named 'b'"):
        lora.remove_adapter(expert, "b")
