"""The expert's fast paths compute what the plain ones do: the fused RMS norm, bf16 linears on a
CPU without bf16 instructions, and the per-prompt cache of the text embedding and its keys/values.
"""

import pytest
import torch
import torch.nn.functional as F

from vidmoe.config import TransformerConfig
from vidmoe.models import layers
from vidmoe.models.layers import RMSNorm, linear
from vidmoe.models.lora import AdapterWeights, add_adapter
from vidmoe.models.transformer import WanTransformer
from vidmoe.presets import TINY_TRANSFORMER


@pytest.mark.parametrize("shape", [(2, 1280, 512), (1, 37, 288), (3, 5, 33)])
def test_fused_rms_norm_is_bit_identical_to_the_five_ops(shape):
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1])
    torch.nn.init.normal_(norm.weight)
    for x in (torch.randn(shape) * 3, torch.randn(shape).bfloat16()):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + norm.eps)
        assert torch.equal(norm(x), xf.type_as(x) * norm.weight)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_linear_is_the_bf16_gemm(monkeypatch, native):
    monkeypatch.setattr(layers, "cpu_has_bf16_matmul", lambda: native)
    torch.manual_seed(0)
    x, w, b = torch.randn(64, 96), torch.randn(80, 96), torch.randn(80)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))  # float32: untouched
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    out, torch_bf16 = linear(xb, wb, bb), F.linear(xb, wb, bb)
    assert out.dtype == torch.bfloat16
    if native:
        assert torch.equal(out, torch_bf16)
    else:  # exact products, float32 sums, one rounding: what torch's bf16 kernel computes too
        assert torch.equal(out, F.linear(xb.float(), wb.float(), bb.float()).bfloat16())
        ulp = torch_bf16.float().abs() * 2**-7  # one bf16 ulp is at most 2^-7 relative
        assert ((out.float() - torch_bf16.float()).abs() <= ulp).all()


def _tiny():
    torch.manual_seed(0)
    cfg = TransformerConfig(**{**TINY_TRANSFORMER.to_dict(), "num_layers": 2})
    model = WanTransformer(cfg).eval()
    torch.nn.init.normal_(model.head.head.weight, std=0.02)  # the release init zeroes it
    return model


def _inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(2, cfg.in_dim, 3, 8, 8, generator=g)
    context = [torch.randn(5, cfg.text_dim, generator=g), torch.randn(7, cfg.text_dim, generator=g)]
    return x, torch.tensor([0.9, 0.4]), context


def test_text_cache_serves_the_same_prompt_and_nothing_else():
    model = _tiny()
    x, sigma, context = _inputs(model)
    with torch.no_grad():
        first = model(x, sigma, context)
        cached_emb = model.text_cache.value[0]
        kv = model.blocks[0].cross_attn.text_kv_cache.value
        again = model(x, sigma, [c.clone() for c in context])  # equal prompts, new tensors
        assert model.text_cache.value[0] is cached_emb  # served, not recomputed
        assert model.blocks[0].cross_attn.text_kv_cache.value is kv
        assert torch.equal(again, first)
        other = [c + 1 for c in context]
        changed = model(x, sigma, other)
    with torch.enable_grad():  # no cache: the reference
        assert torch.equal(first, model(x, sigma, context))
        assert torch.equal(changed, model(x, sigma, other))
    assert not torch.equal(changed, first)


@pytest.mark.parametrize("where", ["text_embedding.0.weight", "blocks.1.cross_attn.v.weight"])
def test_text_cache_follows_weight_updates(where):
    model = _tiny()
    x, sigma, context = _inputs(model)
    with torch.no_grad():
        model(x, sigma, context)
        model.get_parameter(where).mul_(1.5)  # in place, as an optimiser step or a load
        after = model(x, sigma, context)
    with torch.enable_grad():
        assert torch.equal(after, model(x, sigma, context))


def test_no_text_cache_with_an_adapter_or_gradients():
    model = _tiny()
    x, sigma, context = _inputs(model)
    model(x, sigma, context)  # gradients on
    assert model.text_cache is None and model.blocks[0].cross_attn.text_kv_cache is None
    d = model.config.dim
    g = torch.Generator().manual_seed(3)
    add_adapter(
        model,
        "style",
        {
            "text_embedding.2": AdapterWeights(
                down=torch.randn(2, d, generator=g), up=torch.randn(d, 2, generator=g)
            )
        },
    )
    with torch.no_grad():
        model(x, sigma, context)
    assert model.text_cache is None
