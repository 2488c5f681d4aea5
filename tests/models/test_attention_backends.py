"""Attention backends: 'auto' is SDPA on the CPU (bit-identical), a backend that cannot honour an
input is refused with the reason, a registered backend is dispatched with the (B, L, N, Dh) layout
and the expert's window; regional compile of the blocks equals eager."""

import dataclasses
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from vidmoe.config import TransformerConfig
from vidmoe.loading import load_pipeline
from vidmoe.models.attention import (
    ATTENTION_BACKENDS,
    HALF,
    AttentionBackend,
    attention,
    register_backend,
    resolve_backend,
    window_mask,
)
from vidmoe.models.transformer import WanTransformer
from vidmoe.presets import TINY_TRANSFORMER

CUDA = torch.cuda.is_available()


def _tiny(**kw) -> WanTransformer:
    torch.manual_seed(0)
    model = WanTransformer(TransformerConfig(**{**TINY_TRANSFORMER.to_dict(), **kw})).eval()
    torch.nn.init.normal_(model.head.head.weight, std=0.02)  # the release init zeroes it
    return model


def _inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 2, 8, 8, generator=g)  # 2 x 4 x 4 = 32 tokens after patchify
    ctx = torch.randn(batch, TINY_TRANSFORMER.text_len, TINY_TRANSFORMER.text_dim, generator=g)
    return x, torch.tensor([0.9, 0.3][:batch]), ctx


def reference_attention(q, k, v, window=None):
    """Softmax attention in float64 under the dense window mask, the (B, L, N, Dh) layout."""
    scores = torch.einsum("bqnd,bknd->bnqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    if window is not None:
        mask = window_mask((q.shape[1], 1, 1), window, q.device)  # (Lq, Lk)
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bnqk,bknd->bqnd", scores.softmax(-1), v.double()).to(v.dtype)


@pytest.fixture
def recorded(monkeypatch):
    """A float64 reference backend named 'ref' that records what it was called with."""
    calls = []

    def fn(q, k, v, window=None):
        calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "window": window})
        return reference_attention(q, k, v, window)

    monkeypatch.setitem(ATTENTION_BACKENDS, "ref", AttentionBackend(name="ref", fn=fn))
    return calls


def test_auto_on_cpu_is_sdpa_and_bit_identical_to_plain_sdpa():
    assert resolve_backend("auto", device="cpu", dtype=torch.bfloat16, head_dim=128) == "sdpa"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 30, 3, 8, generator=g) for _ in range(3))
    plain = F.scaled_dot_product_attention(*(rearrange(t, "b l n d -> b n l d") for t in (q, k, v)))
    assert torch.equal(attention(q, k, v, backend="sdpa"), rearrange(plain, "b n l d -> b l n d"))
    pipe = load_pipeline("tiny-t2v", device="cpu", dtype="float32")  # attention="auto"
    backends = {
        m.attention_backend
        for e in pipe.experts.values()
        for m in e.modules()
        if hasattr(m, "attention_backend")
    }
    assert backends == {"sdpa"} and set(pipe.source["attention"].values()) == {"sdpa"}


@pytest.mark.parametrize("name,package", [("flash", "flash_attn"), ("sage", "sageattention")])
def test_cuda_backend_on_this_machine_is_refused_with_the_reason(name, package):
    if CUDA and importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed and CUDA is present: nothing is missing here")
    with pytest.raises(ValueError, match=f"attention backend '{name}' cannot run here") as e:
        load_pipeline("tiny-t2v", device="cpu", dtype="float32", attention=name)
    msg = str(e.value)
    if importlib.util.find_spec(package) is None:
        assert f"the {package} package is not installed" in msg and f"vidmoe[{name}]" in msg
    assert "CUDA only, and the device is cpu" in msg
    assert "float16 or bfloat16 inputs, and they are float32" in msg
    assert "Use attention 'sdpa'" in msg


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match="attention must be one of auto, sdpa, flash, sage"):
        resolve_backend("xformers", device="cpu", dtype=torch.float32)


def test_backend_refuses_dtype_head_width_and_window_it_cannot_honour(monkeypatch):
    # sage's own rules, on the CPU: no package, no CUDA requirement, same function
    sage = dataclasses.replace(
        ATTENTION_BACKENDS["sage"],
        name="sage-cpu",
        package=None,
        cuda_only=False,
        fn=reference_attention,
    )
    monkeypatch.setitem(ATTENTION_BACKENDS, "sage-cpu", sage)
    windowed = _tiny(window_size=(3, 5)).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"cannot honour the local window \(3, 5\)"):
        windowed.set_attention("sage-cpu", device="cpu")
    with pytest.raises(ValueError, match="head widths 64, 96 or 128, and this one is 24"):
        _tiny().to(torch.bfloat16).set_attention("sage-cpu", device="cpu")
    ok = _tiny(dim=256, num_heads=2).to(torch.bfloat16)  # head width 128
    assert ok.set_attention("sage-cpu", device="cpu") == "sage-cpu"
    with pytest.raises(ValueError, match="needs float16 or bfloat16 inputs, and they are float32"):
        _tiny(dim=256, num_heads=2).set_attention("sage-cpu", device="cpu")
    # and at call time: fp32 inputs reaching a half-only backend raise, never fall back
    q = torch.randn(1, 4, 2, 128)
    with pytest.raises(ValueError, match="cannot run these inputs: it needs float16"):
        attention(q, q, q, backend="sage-cpu")


def test_registered_backend_gets_the_layout_and_window_of_each_attention(recorded):
    window = (5, 3)
    model = _tiny(window_size=window)
    x, sigma, ctx = _inputs()
    with torch.no_grad():
        want = model(x, sigma, ctx)
        assert model.set_attention("ref", device="cpu") == "ref"
        got = model(x, sigma, ctx)
    B, N, Dh, L, S = 2, 4, 24, 32, TINY_TRANSFORMER.text_len
    assert (
        recorded
        == [
            {"q": (B, L, N, Dh), "k": (B, L, N, Dh), "window": window},  # self-attention
            {"q": (B, L, N, Dh), "k": (B, S, N, Dh), "window": None},  # cross-attention, no mask
        ]
        * TINY_TRANSFORMER.num_layers
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # SDPA's chunked window agrees


def test_register_refuses_the_name_auto():
    with pytest.raises(ValueError, match="'auto' is the automatic choice"):
        register_backend(AttentionBackend(name="auto", fn=reference_attention))


def test_regional_compile_equals_eager_and_compiles_once_per_block_type():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    experts = [_tiny(), _tiny()]  # two experts of one shape: 4 blocks, one compilation
    x, sigma, ctx = _inputs()
    with torch.no_grad():
        want = [e(x, sigma, ctx) for e in experts]
        for e in experts:
            e.compile_blocks()
        got = [e(x, sigma, ctx) for e in experts]
        again = experts[0](x, sigma, ctx)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, want[0], rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_load_pipeline_compile_records_it():
    pipe = load_pipeline("tiny-t2v", device="cpu", dtype="float32", compile=True)
    assert pipe.source["compile"] == "blocks"
    block = next(iter(pipe.experts.values())).blocks[0]
    assert block._compiled_call_impl is not None


def _compare_on_cuda(name: str, window, tol: float) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(2, 300, 4, 128, generator=g, device="cuda", dtype=torch.bfloat16)
        for _ in range(3)
    )
    got = attention(q, k, v, window, backend=name)
    want = reference_attention(q, k, v, window)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.skipif(
    not CUDA or importlib.util.find_spec("flash_attn") is None,
    reason="flash-attn runs on CUDA only and needs its package: pip install 'vidmoe[flash]'",
)
@pytest.mark.parametrize("window", [None, (7, 7), (16, -1)])
def test_flash_equals_reference_with_its_native_window(window):
    _compare_on_cuda("flash", window, 2e-2)
    assert resolve_backend("auto", device="cuda", dtype=torch.bfloat16, head_dim=128) == "flash"


@pytest.mark.skipif(
    not CUDA or importlib.util.find_spec("sageattention") is None,
    reason="SageAttention runs on CUDA only and needs its package: pip install 'vidmoe[sage]'",
)
def test_sage_approximates_reference():
    _compare_on_cuda("sage", None, 5e-2)  # int8 Q.K^T: approximate by design
    assert HALF == (torch.float16, torch.bfloat16)


def test_cli_refuses_a_backend_it_cannot_run_before_writing(tmp_path):
    from typer.testing import CliRunner

    from vidmoe.cli import app

    out = tmp_path / "a.mp4"
    r = CliRunner().invoke(
        app,
        [
            "generate",
            "x",
            "-m",
            "tiny-t2v",
            "--device",
            "cpu",
            "-q",
            "--attention",
            "sage",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 2 and "attention backend 'sage' cannot run here" in r.output
    assert not out.exists()


def test_serve_config_refuses_an_unknown_backend():
    pytest.importorskip("fastapi", reason="the server needs the serve extra")
    from vidmoe.serve.state import ServeConfig

    assert ServeConfig(attention="sdpa", compile=True).compile
    with pytest.raises(ValueError, match="attention must be one of auto, sdpa, flash, sage"):
        ServeConfig(attention="xformers")
