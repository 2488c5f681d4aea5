"""fp8 (e4m3) weights: per-channel quantisation, FP8Linear, and fp8 files (plain and ComfyUI
fp8_scaled) loaded strictly, dequantised or kept in fp8."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vidmoe.config import TransformerConfig
from vidmoe.io.atomic import save_safetensors_atomic
from vidmoe.io.checkpoints import detect_layout, load_expert
from vidmoe.io.tensors import SCALED_FP8_MARKER
from vidmoe.models.fp8 import (
    FP8_DTYPE,
    FP8Linear,
    dequantize,
    fp8_bytes,
    fp8_layer_names,
    quantize_fp8_,
    quantize_weight,
)
from vidmoe.models.transformer import WanTransformer

CFG = TransformerConfig(dim=256, num_heads=2, ffn_dim=64, num_layers=2, text_dim=16, freq_dim=32)
PREFIX = "model.diffusion_model."


def tiny_expert(seed: int = 0) -> WanTransformer:
    torch.manual_seed(seed)
    expert = WanTransformer(CFG)
    nn.init.normal_(expert.head.head.weight, std=0.02)
    return expert.eval()


def run(expert: nn.Module, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, CFG.in_dim, 2, 4, 4, generator=g, dtype=dtype)
    context = [torch.randn(5, CFG.text_dim, generator=g, dtype=dtype)]
    with torch.no_grad():
        return expert(x, torch.tensor([0.7]), context).float()


def test_per_channel_quantisation_error_is_within_e4m3_precision():
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scales
    q, scale = quantize_weight(w)
    assert q.dtype == FP8_DTYPE and scale.shape == (64,)
    back = dequantize(q, scale, torch.float32)
    # e4m3 keeps 3 mantissa bits: rounding error <= 2^-4 of the value, plus the subnormal step
    bound = w.abs() / 16 + scale[:, None] * 2.0**-9
    assert (back - w).abs().le(bound).all()
    zero_q, zero_scale = quantize_weight(torch.zeros(3, 4))
    assert torch.equal(dequantize(zero_q, zero_scale, torch.float32), torch.zeros(3, 4))


def test_fp8_linear_matches_its_float_linear_and_keeps_fp8_through_dtype_casts():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    fp8 = FP8Linear.from_linear(linear)
    x = torch.randn(7, 96)
    ref = linear(x)
    err = (fp8(x) - ref).norm() / ref.norm()
    assert 0 < err < 0.05
    fp8.to(torch.bfloat16)  # a dtype cast moves nothing out of fp8
    assert fp8.weight.dtype == FP8_DTYPE and fp8.scale_weight.dtype == torch.float32
    assert torch.allclose(fp8(x.bfloat16()).float(), fp8(x), rtol=0.02, atol=0.02)
    with pytest.raises(ValueError, match="matmul must be one of dequant, scaled"):
        FP8Linear(4, 4, matmul="int8")


def test_quantized_expert_is_close_to_float_and_stores_block_weights_in_a_quarter():
    expert = tiny_expert()
    ref = run(expert)
    names = fp8_layer_names(expert)
    before = sum(fp8_bytes(expert.get_submodule(n)) for n in names)
    quantize_fp8_(expert)
    assert len(names) == CFG.num_layers * 10  # q k v o twice (self, cross) + two ffn layers
    assert all(isinstance(expert.get_submodule(n), FP8Linear) for n in names)
    assert isinstance(expert.head.head, nn.Linear)  # the head stays in float
    err = ((run(expert) - ref).norm() / ref.norm()).item()
    assert 0 < err < 0.05, err
    after = sum(fp8_bytes(expert.get_submodule(n)) for n in names)
    assert after < 0.3 * before  # fp32 -> one byte per weight, plus a scale and bias per row


def comfy_fp8_scaled_file(path, expert: nn.Module, *, per_tensor: bool = True, drop_scales=False):
    """An expert written as ComfyUI writes fp8_scaled files: the block linears in e4m3 with a
    `scale_weight` each (per tensor), a `scaled_fp8` marker, everything else in bf16."""
    out = {SCALED_FP8_MARKER: torch.zeros(2, dtype=FP8_DTYPE)}
    fp8 = {f"{n}.weight" for n in fp8_layer_names(expert)}
    for name, t in expert.state_dict().items():
        if name in fp8:
            amax = t.abs().amax() if per_tensor else t.abs().amax(dim=1)
            scale = (amax / 448.0).float()
            out[PREFIX + name] = (t / (scale if per_tensor else scale[:, None])).to(FP8_DTYPE)
            if not drop_scales:
                out[PREFIX + name[: -len(".weight")] + ".scale_weight"] = scale
                out[PREFIX + name[: -len(".weight")] + ".scale_input"] = torch.ones(())
        else:
            out[PREFIX + name] = t.to(torch.bfloat16)
    return save_safetensors_atomic(out, path)


def test_comfyui_fp8_scaled_file_loads_dequantised_with_its_scales(tmp_path):
    expert = tiny_expert()
    path = comfy_fp8_scaled_file(
        tmp_path / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", expert
    )
    layout = detect_layout(path)
    assert layout.kind == "comfyui" and list(layout.experts) == ["high_noise"]
    loaded = load_expert(layout, "high_noise", dtype=torch.float32)
    name = "blocks.0.self_attn.q"
    from safetensors.torch import load_file

    raw = load_file(path)
    want = raw[f"{PREFIX}{name}.weight"].float() * raw[f"{PREFIX}{name}.scale_weight"]
    assert torch.equal(loaded.get_submodule(name).weight, want)  # fp8 * scale, never fp8 alone
    ref = run(expert)
    err = ((run(loaded) - ref).norm() / ref.norm()).item()
    assert err < 0.05, err
    # kept in fp8: the file's values as they are, its per-tensor scale on every row
    kept = load_expert(layout, "high_noise", dtype=torch.float32, quantize="fp8")
    layer = kept.get_submodule(name)
    assert isinstance(layer, FP8Linear)
    assert torch.equal(
        layer.weight.view(torch.uint8), raw[f"{PREFIX}{name}.weight"].view(torch.uint8)
    )
    assert torch.equal(layer.scale_weight, raw[f"{PREFIX}{name}.scale_weight"].expand(CFG.dim))
    assert torch.allclose(run(kept), run(loaded), rtol=1e-5, atol=1e-5)


def test_scaled_file_without_its_scales_is_refused(tmp_path):
    path = comfy_fp8_scaled_file(
        tmp_path / "high_noise.safetensors", tiny_expert(), drop_scales=True
    )
    with pytest.raises(ValueError, match="lacks the scale_weight of 20 fp8 weight"):
        load_expert(detect_layout(path), "high_noise", dtype=torch.float32)


def test_plain_e4m3_file_loads_with_scale_one(tmp_path):
    expert = tiny_expert()
    fp8 = {f"{n}.weight" for n in fp8_layer_names(expert)}
    tensors = {
        PREFIX + n: (t.to(FP8_DTYPE) if n in fp8 else t) for n, t in expert.state_dict().items()
    }
    path = save_safetensors_atomic(tensors, tmp_path / "low_noise_e4m3fn.safetensors")
    loaded = load_expert(detect_layout(path), "low_noise", dtype=torch.float32)
    w = expert.blocks[1].ffn[0].weight
    assert torch.equal(loaded.blocks[1].ffn[0].weight, w.to(FP8_DTYPE).float())


def test_quantize_at_load_equals_quantizing_the_loaded_float_expert(tmp_path):
    from vidmoe.io.writers import write_comfyui_file

    expert = tiny_expert()
    path = write_comfyui_file(expert.state_dict(), tmp_path / "high_noise.safetensors")
    layout = detect_layout(path)
    at_load = load_expert(layout, "high_noise", dtype=torch.float32, quantize="fp8")
    after = quantize_fp8_(load_expert(layout, "high_noise", dtype=torch.float32))
    for (n, a), (m, b) in zip(at_load.state_dict().items(), after.state_dict().items()):
        assert n == m and a.dtype == b.dtype
        assert torch.equal(
            a.view(torch.uint8) if a.dtype == FP8_DTYPE else a,
            b.view(torch.uint8) if b.dtype == FP8_DTYPE else b,
        ), n
    with pytest.raises(ValueError, match="quantize must be None or 'fp8'"):
        load_expert(layout, "high_noise", quantize="int4")


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="fp8 tensor-core matmul needs a CUDA GPU of compute capability 8.9 or newer",
)
def test_scaled_matmul_on_gpu_matches_dequantised():
    torch.manual_seed(0)
    linear = nn.Linear(256, 128).cuda().bfloat16()
    a, b = FP8Linear.from_linear(linear), FP8Linear.from_linear(linear, matmul="scaled")
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    ref = a(x).float()
    assert ((b(x).float() - ref).norm() / ref.norm()).item() < 0.05


def test_load_pipeline_quantize_fp8_keeps_the_video_close():
    from vidmoe.loading import load_pipeline

    plain = load_pipeline(None, device="cpu")
    fp8 = load_pipeline(None, device="cpu", quantize="fp8")
    assert fp8.source["quantize"] == "fp8"
    layers = [m for e in fp8.experts.values() for m in e.modules() if isinstance(m, FP8Linear)]
    assert len(layers) == sum(len(fp8_layer_names(e)) for e in plain.experts.values()) > 0
    a = plain.generate("a red circle moving to the right", seed=1, num_steps=4)
    b = fp8.generate("a red circle moving to the right", seed=1, num_steps=4)
    diff = abs(a.frames.astype(float) - b.frames.astype(float)).mean()
    assert 0 < diff < 6.0, diff  # levels of 255: close, not identical
    with pytest.raises(ValueError, match="quantize must be fp8 or None"):
        load_pipeline("tiny-t2v", quantize="int4")


def test_cli_quantize_and_step_cache(tmp_path):
    import json

    from typer.testing import CliRunner

    from vidmoe.cli import app

    out = tmp_path / "v.mp4"
    r = CliRunner().invoke(
        app,
        [
            "generate",
            "a cat",
            "-m",
            "tiny-t2v",
            "-s",
            "6",
            "-q",
            "-o",
            str(out),
            "--quantize",
            "fp8",
            "--step-cache",
            "high_noise=50,low_noise=50",
        ],
    )
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "v.mp4.json").read_text())
    assert record["settings"]["step_cache"] == {"high_noise": 50.0, "low_noise": 50.0}
    assert any("cached" in row for row in record["trace"])
    bad = CliRunner().invoke(
        app, ["generate", "x", "-m", "tiny-t2v", "-o", str(out), "--step-cache", "fast"]
    )
    assert bad.exit_code == 2 and "--step-cache must be a number" in bad.output
