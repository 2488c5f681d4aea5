"""Components from separate files: each expert format loads through `experts=` / `--expert` on top
of a model folder or alone (with `vae=` and `text_encoder=`); fp8 scales are applied or the load
is refused; ComfyUI umT5 names map; GGUF experts dequantise; `convert` round-trips (every
layout pair: tests/io/test_convert.py)."""

import dataclasses

import pytest
import torch

from tests.checkpoints import (
    save_word_tokenizer,
    tiny_pipeline_weights,
    tiny_umt5_release_weights,
    write_tiny_official,
)
from vidmoe.io.atomic import save_safetensors_atomic
from vidmoe.io.components import load_text_encoder_file, open_expert_file
from vidmoe.io.convert import convert
from vidmoe.io.layouts import RELEASE_T5_FILE
from vidmoe.io.tensors import DictSource, SafetensorsFile
from vidmoe.io.writers import (
    FP8ScaledView,
    save_torch_atomic,
    write_comfyui_file,
    write_diffusers_transformer,
)
from vidmoe.loading import build_random_pipeline, load_pipeline
from vidmoe.models.text_encoder import build_text_encoder
from vidmoe.models.umt5 import release_umt5_to_hf
from vidmoe.presets import TINY_TRANSFORMER, TINY_VAE

# A transformer whose file alone implies it: 128-wide heads (dim / 128), K-quantisable rows (256).
WIDE = dataclasses.replace(
    TINY_TRANSFORMER, dim=256, ffn_dim=256, num_heads=2, num_layers=1, text_len=512
)


def weights_of(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def random_expert(cfg, seed: int) -> dict[str, torch.Tensor]:
    from vidmoe.models.transformer import WanTransformer

    torch.manual_seed(seed)
    expert = WanTransformer(cfg)
    for p in expert.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return weights_of(expert)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return write_tiny_official(tmp_path_factory.mktemp("ckpt") / "Wan-tiny")


@pytest.fixture(scope="module")
def new_high():
    return random_expert(TINY_TRANSFORMER, 7)


def max_diff(module, expected) -> float:
    got = module.state_dict()
    assert set(got) == set(expected)
    return max(float((got[k].float() - v.float()).abs().max()) for k, v in expected.items())


def write_format(kind: str, tensors, folder):
    """One expert written in `kind`; returns (path, tolerance relative to the weights' scale)."""
    if kind == "comfyui-bf16":
        bf16 = {k: v.bfloat16() for k, v in tensors.items()}
        return write_comfyui_file(bf16, folder / "x.safetensors"), 0.0
    if kind == "comfyui-fp16":
        fp16 = {k: v.half() for k, v in tensors.items()}
        return write_comfyui_file(fp16, folder / "x.safetensors", prefix="diffusion_model."), 1e-3
    if kind == "fp8-plain":
        plain = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in tensors.items()}
        return write_comfyui_file(plain, folder / "x.safetensors"), 0.07
    if kind == "fp8_scaled":
        return write_comfyui_file(tensors, folder / "x.safetensors", quantize="fp8"), 0.07
    if kind == "diffusers-folder":
        write_diffusers_transformer(tensors, TINY_TRANSFORMER, folder / "transformer")
        return folder / "transformer", 0.0
    if kind == "release-file":
        return save_safetensors_atomic(tensors, folder / "high.safetensors"), 0.0
    raise AssertionError(kind)


KINDS = [
    "comfyui-bf16",
    "comfyui-fp16",
    "fp8-plain",
    "fp8_scaled",
    "diffusers-folder",
    "release-file",
]


@pytest.mark.parametrize("kind", KINDS)
def test_expert_file_on_top_of_a_folder(tmp_path, official, new_high, kind):
    path, tol = write_format(kind, new_high, tmp_path)
    pipe = load_pipeline(official, device="cpu", dtype="float32", experts={"high_noise": path})
    scale = max(float(v.abs().max()) for v in new_high.values())
    assert max_diff(pipe.experts["high_noise"], new_high) <= tol * scale + (
        1e-2 if "bf16" in kind else 0
    )
    base = load_pipeline(official, device="cpu", dtype="float32")
    assert max_diff(pipe.experts["low_noise"], weights_of(base.experts["low_noise"])) == 0
    assert max_diff(base.experts["high_noise"], new_high) > 0.01  # the file really replaced it
    assert pipe.source["layout"] == "official+files"


def test_dropped_scales_are_refused(tmp_path, official, new_high):
    path = write_comfyui_file(new_high, tmp_path / "x.safetensors", quantize="fp8")
    f = SafetensorsFile(path)
    kept = {n: f[n] for n in f if not n.endswith("blocks.0.ffn.0.scale_weight")}
    save_safetensors_atomic(kept, tmp_path / "damaged.safetensors")
    with pytest.raises(ValueError, match="damaged.safetensors.*lacks the scale_weight"):
        load_pipeline(official, experts={"high_noise": tmp_path / "damaged.safetensors"})


def test_a_scaled_file_really_needs_its_scales(new_high):
    """Read without its scales, an fp8_scaled weight is ~1/scale too large: the scales matter."""
    view = FP8ScaledView(DictSource(new_high))
    raw = view["blocks.0.ffn.0.weight"].float()
    true = new_high["blocks.0.ffn.0.weight"]
    assert raw.abs().max() > 100 * true.abs().max()


def test_expert_that_does_not_fit_is_named(tmp_path, official):
    other = random_expert(dataclasses.replace(TINY_TRANSFORMER, ffn_dim=128), 3)
    path = write_comfyui_file(other, tmp_path / "wrong.safetensors")
    with pytest.raises(
        ValueError,
        match=r"wrong.safetensors: cannot load.*'blocks.0.ffn.0.weight', \(192, 96\), \(128, 96\)",
    ):
        load_pipeline(official, experts={"high_noise": path})


def test_experts_that_disagree_are_refused(tmp_path):
    a = write_comfyui_file(random_expert(WIDE, 1), tmp_path / "a_high_noise.safetensors")
    b = write_comfyui_file(
        random_expert(dataclasses.replace(WIDE, ffn_dim=512), 2),
        tmp_path / "b_low_noise.safetensors",
    )
    vae = save_torch_atomic(weights_of(build_random_pipeline("tiny-t2v").vae), tmp_path / "vae.pth")
    with pytest.raises(
        ValueError, match=r"expert low_noise \(.*b_low_noise.*disagrees.*ffn_dim 256 vs 512"
    ):
        load_pipeline(None, experts={"high_noise": a, "low_noise": b}, vae=vae)


def comfyui_umt5(tmp_path, *, fp8: bool):
    """A tiny umT5 in ComfyUI's layout (HF names, no embed_tokens copy), tokenizer beside it."""
    hf = release_umt5_to_hf(tiny_umt5_release_weights(0))
    hf = {k: v for k, v in hf.items() if k != "encoder.embed_tokens.weight"}
    if fp8:
        from vidmoe.models.fp8 import quantize_weight

        out = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
        for k, v in hf.items():
            if ".SelfAttention." in k and "relative" not in k or "DenseReluDense" in k:
                q, s = quantize_weight(v)
                out[k], out[k[: -len("weight")] + "scale_weight"] = q, s
            else:
                out[k] = v
        hf = out
    path = save_safetensors_atomic(
        hf, tmp_path / f"umt5_xxl_{'fp8_e4m3fn_scaled' if fp8 else 'fp16'}.safetensors"
    )
    save_word_tokenizer(tmp_path / "tokenizer")
    return path


@pytest.mark.parametrize("fp8", [False, True])
def test_comfyui_umt5_file(tmp_path, official, fp8):
    path = comfyui_umt5(tmp_path, fp8=fp8)
    got = load_text_encoder_file(path, dtype=torch.float32, max_length=16)
    want = build_text_encoder("umt5-xxl", official, dtype=torch.float32, max_length=16)
    a, b = got.encode(["a red circle"])[0], want.encode(["a red circle"])[0].float()
    err = float((a - b).abs().max() / b.abs().max())
    assert err < (0.1 if fp8 else 1e-5)
    if fp8:
        assert err > 0  # the weights really went through fp8


def test_files_without_a_model_folder_generate(tmp_path):
    experts = {
        n: write_comfyui_file(random_expert(WIDE, i), tmp_path / f"wan_{n}.safetensors")
        for i, n in enumerate(("high_noise", "low_noise"))
    }
    vae = save_torch_atomic(weights_of(build_random_pipeline("tiny-t2v").vae), tmp_path / "vae.pth")
    text = comfyui_umt5(tmp_path, fp8=False)
    pipe = load_pipeline(
        None, device="cpu", dtype="float32", experts=experts, vae=vae, text_encoder=text
    )
    assert pipe.config.transformer.dim == 256 and pipe.config.vae == TINY_VAE
    assert pipe.source["layout"] == "files"
    from vidmoe.sampling.settings import GenerateSettings

    out = pipe.generate(
        GenerateSettings(
            prompt="a red circle",
            width=32,
            height=32,
            num_frames=5,
            num_steps=2,
            boundary="steps:1",
        ),
        progress=False,
    )
    assert out.frames.shape[:3] == (5, 32, 32)
    assert {e for t in out.trace for e in t["experts"]} == {"high_noise", "low_noise"}


def test_files_alone_need_a_vae(tmp_path):
    path = write_comfyui_file(random_expert(WIDE, 1), tmp_path / "wan_high_noise.safetensors")
    with pytest.raises(ValueError, match="need the VAE: give --vae"):
        load_pipeline(None, experts={"high_noise": path, "low_noise": path})


gguf = pytest.importorskip("gguf", reason="GGUF experts need the gguf package (vidmoe[gguf])")


def k_quant_bytes(x, bits: int):
    """Q4_K (bits 4) or Q5_K (bits 5) blocks of `x` (rows, n), n % 256 == 0, encoded here from
    ggml's block layout (the gguf package only decodes K-quants): per 256 values a float16 scale
    and min, 8 six-bit sub-block scales and mins, then the values (5th bits in `qh`)."""
    import numpy as np

    rows = x.shape[0]
    b = x.reshape(-1, 8, 32).astype(np.float32)  # (blocks, sub-blocks, 32)
    levels = 2**bits - 1
    m = -np.minimum(b.min(-1), 0)  # (nb, 8) value = s * q - m
    s = (b.max(-1) + m) / levels
    d = (s.max(-1) / 63).astype(np.float16)
    dmin = (m.max(-1) / 63).astype(np.float16)
    df, mf = (
        np.where(d > 0, d, 1).astype(np.float32),
        np.where(dmin > 0, dmin, 1).astype(np.float32),
    )
    sc = np.clip(np.round(s / df[:, None]), 1, 63).astype(np.uint8)
    mn = np.clip(np.ceil(m / mf[:, None]), 0, 63).astype(np.uint8)
    step, low = d.astype(np.float32)[:, None] * sc, dmin.astype(np.float32)[:, None] * mn
    q = np.clip(np.round((b + low[..., None]) / step[..., None]), 0, levels).astype(np.uint8)
    scales = np.zeros((len(b), 12), np.uint8)
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    qs = (q[:, 0::2] & 0xF) | ((q[:, 1::2] & 0xF) << 4)  # (nb, 4, 32)
    parts = [d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), scales]
    if bits == 5:
        qh = sum(((q[:, j] >> 4) & 1) << j for j in range(8)).astype(np.uint8)  # (nb, 32)
        parts.append(qh)
    parts.append(qs.reshape(len(b), 128))
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def write_gguf(tensors, path, qtype):
    """As the ComfyUI-GGUF converters do: big 2-D weights quantised, the rest F32; >4-D tensors
    stored flattened with their shape in `comfy.gguf.orig_shape.<name>`."""
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch="wan")
    for name, t in tensors.items():
        data = t.float().numpy()
        if data.ndim > 4:
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(data.shape))
            data = data.reshape(data.shape[0], -1)
        if data.ndim == 2 and data.shape[1] % 256 == 0 and data.shape[0] >= 256:
            kq = {"Q4_K": 4, "Q5_K": 5}.get(qtype.name)
            q = k_quant_bytes(data, kq) if kq else gguf.quants.quantize(data, qtype)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "qtype,tol", [("Q8_0", 0.01), ("Q5_0", 0.05), ("Q4_0", 0.1), ("Q5_K", 0.05), ("Q4_K", 0.1)]
)
def test_gguf_expert(tmp_path, qtype, tol):
    weights = random_expert(WIDE, 5)
    path = write_gguf(
        weights, tmp_path / f"wan_high_noise-{qtype}.gguf", gguf.GGMLQuantizationType[qtype]
    )
    f = open_expert_file(path)
    assert f.naming == "gguf" and f.config.dim == 256
    assert qtype in set(f.tensors.types.values())  # some tensors really are quantised
    for name, w in weights.items():
        err = float((f.tensors[name] - w).abs().max() / w.abs().max())
        assert err <= tol, (name, err)
    vae = save_torch_atomic(weights_of(build_random_pipeline("tiny-t2v").vae), tmp_path / "vae.pth")
    pipe = load_pipeline(
        None,
        dtype="float32",
        experts={"high_noise": path, "low_noise": path},
        vae=vae,
        text_encoder=comfyui_umt5(tmp_path, fp8=False),
    )
    x = torch.randn(1, 16, 1, 4, 4)
    ctx = torch.randn(1, 8, 48)
    v = pipe.experts["high_noise"](x, torch.tensor([0.5]), ctx)
    assert v.shape == x.shape and torch.isfinite(v).all()


@pytest.mark.parametrize("layout", ["official", "diffusers", "vidmoe", "comfyui"])
@pytest.mark.parametrize("quantize", [None, "fp8"])
def test_convert_round_trip(tmp_path, official, layout, quantize):
    dst = tmp_path / "out"
    convert(official, dst, layout=layout, quantize=quantize)
    _, experts, vae = tiny_pipeline_weights("tiny-t2v", 0)
    if layout == "comfyui":
        files = {n: dst / f"{n}.safetensors" for n in experts}
        modules = load_pipeline(
            official, dtype="float32", experts=files, vae=dst / "vae.safetensors"
        ).experts
    else:
        text = official / RELEASE_T5_FILE
        modules = load_pipeline(dst, device="cpu", dtype="float32", text_encoder=text).experts
    for n, w in experts.items():
        err = max_diff(modules[n], w)
        assert (
            err == 0
            if quantize is None
            else 0 < err < 0.07 * max(float(v.abs().max()) for v in w.values())
        )
    if quantize:
        written = [p for p in dst.rglob("*.safetensors") if "vae" not in p.name]
        assert any("scaled_fp8" in SafetensorsFile(p) for p in written)


def test_cli_generate_with_expert_files(tmp_path, official, new_high):
    import json

    from typer.testing import CliRunner

    from vidmoe.cli import app

    path = write_comfyui_file(
        new_high, tmp_path / "wan_high_noise_fp8_scaled.safetensors", quantize="fp8"
    )
    out = tmp_path / "v.mp4"
    r = CliRunner().invoke(
        app,
        [
            "generate",
            "a red circle",
            "-m",
            str(official),
            "--expert",
            f"high_noise={path}",
            "-f",
            "5",
            "-W",
            "32",
            "-H",
            "32",
            "-s",
            "2",
            "--device",
            "cpu",
            "-q",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    record = json.loads(out.with_name("v.mp4.json").read_text())
    files = record["model"]["files"]  # the file given, and the folder's for the rest
    assert files["expert.high_noise"] == str(path)
    assert files["expert.low_noise"].startswith(str(official / "low_noise_model"))
    assert files["vae"] == str(official / "Wan2.1_VAE.pth")
    r = CliRunner().invoke(app, ["generate", "x", "--expert", "high_noise", "-o", str(out)])
    assert r.exit_code == 2 and "--expert takes NAME=FILE" in r.output


def test_cli_convert(tmp_path, official):
    from typer.testing import CliRunner

    from vidmoe.cli import app

    r = CliRunner().invoke(
        app,
        ["convert", str(official), str(tmp_path / "c"), "--layout", "vidmoe", "--quantize", "fp8"],
    )
    assert r.exit_code == 0, r.output
    assert "scaled_fp8" in SafetensorsFile(tmp_path / "c" / "experts" / "high_noise.safetensors")
    r = CliRunner().invoke(
        app, ["convert", str(official), str(tmp_path / "c"), "--layout", "vidmoe"]
    )
    assert r.exit_code == 2 and "exists" in r.output
    r = CliRunner().invoke(app, ["convert", str(official), str(tmp_path / "d"), "--layout", "onnx"])
    assert r.exit_code == 2 and "--layout must be one of" in r.output
    args = ["convert", str(official), str(tmp_path / "g"), "--layout", "gguf"]
    r = CliRunner().invoke(app, [*args, "--quantize", "q4_k"])
    assert r.exit_code == 2 and "cannot write them" in r.output and not (tmp_path / "g").exists()
    r = CliRunner().invoke(app, [*args, "--quantize", "q8_0"])
    assert r.exit_code == 0, r.output
    assert "expert.high_noise: " in r.output and "text_encoder: " in r.output
    assert (tmp_path / "g" / "high_noise.gguf").is_file()
