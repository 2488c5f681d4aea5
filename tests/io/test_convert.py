"""`vidmoe convert` writes everything (experts, VAE, umT5 and its tokenizer) in each layout, and
every layout pair round-trips: convert then load gives the source's model bit for bit (every
weight and setting, so every video), each target layout generates the source's video exactly,
and the quantised forms (fp8, GGUF quant types) stay within a stated, measured tolerance."""

import dataclasses
import json

import pytest
import torch

from tests.checkpoints import write_tiny_diffusers, write_tiny_official
from vidmoe.io.convert import CONVERT_LAYOUTS, convert
from vidmoe.io.tensors import SafetensorsFile
from vidmoe.loading import DEMO_DIR, load_pipeline

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")

PROMPT = "a red circle"
# both experts run (one step each); 5 frames exercise the VAE's temporal cache
RUN = dict(seed=1, num_steps=2, boundary="steps:1", num_frames=5, width=16, height=16)
FOLDERS = ("official", "diffusers", "vidmoe")
EXPERTS = ("high_noise", "low_noise")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same tiny model (fp32, umT5 and tokenizer included) in the three folder layouts."""
    root = tmp_path_factory.mktemp("convert")
    official = write_tiny_official(root / "official")  # as the release writes it (.pth pickles)
    return {
        "official": official,
        "diffusers": write_tiny_diffusers(root / "diffusers"),  # as diffusers writes it
        "vidmoe": convert(official, root / "vidmoe", layout="vidmoe").path,
    }


@dataclasses.dataclass
class Reference:
    pipe: object
    video: object


@pytest.fixture(scope="module")
def reference(sources):
    pipe = load_pipeline(sources["official"], device="cpu", dtype="float32")
    return Reference(pipe=pipe, video=pipe.generate(PROMPT, **RUN))


def load_converted(dst, layout, config_from, **kwargs):
    """A folder layout loads alone; one-file-per-expert layouts carry no config, so the source
    folder gives it while every weight comes from the converted files."""
    if layout not in ("comfyui", "gguf"):
        return load_pipeline(dst, device="cpu", dtype="float32", **kwargs)
    suffix = ".gguf" if layout == "gguf" else ".safetensors"
    return load_pipeline(
        config_from,
        device="cpu",
        dtype="float32",
        experts={n: dst / f"{n}{suffix}" for n in EXPERTS},
        vae=dst / "vae.safetensors",
        text_encoder=next(dst.glob("umt5_xxl_*.safetensors")),
    )


def plain(config):
    """A config without its name, the VAE's latent statistics spelled out (() is 0 / 1)."""
    z = config.vae.z_dim
    vae = dataclasses.replace(
        config.vae,
        latents_mean=config.vae.latents_mean or (0.0,) * z,
        latents_std=config.vae.latents_std or (1.0,) * z,
    )
    return dataclasses.replace(config, name="", vae=vae)


def same_model(pipe, ref) -> None:
    """Every weight (experts, VAE, umT5) and every setting but the name equal, bit for bit:
    the same model, so the same video for any request."""
    assert plain(pipe.config) == plain(ref.config)
    pairs = [(pipe.experts[n], ref.experts[n]) for n in EXPERTS]
    pairs += [(pipe.vae, ref.vae), (pipe.text_encoder.model, ref.text_encoder.model)]
    for ours, theirs in pairs:
        want = theirs.state_dict()
        got = ours.state_dict()
        assert set(got) == set(want)
        for name, value in got.items():
            assert value.dtype == want[name].dtype and torch.equal(value, want[name]), name


@pytest.mark.parametrize("target", CONVERT_LAYOUTS)
@pytest.mark.parametrize("source", FOLDERS)
def test_every_layout_pair_loads_the_sources_model(tmp_path, sources, reference, source, target):
    dst = tmp_path / target
    out = convert(sources[source], dst, layout=target)
    assert {"text_encoder", "tokenizer", "vae"} <= set(out.files) and not out.notes
    assert not [p for p in dst.rglob("*") if p.suffix in (".pth", ".pt", ".bin")]  # no pickles
    same_model(load_converted(dst, target, sources["official"]), reference.pipe)


@pytest.mark.parametrize("target", CONVERT_LAYOUTS)
def test_each_layout_generates_the_sources_video(tmp_path, sources, reference, target):
    dst = tmp_path / target
    convert(sources["official"], dst, layout=target)
    r = load_converted(dst, target, sources["official"]).generate(PROMPT, **RUN)
    assert torch.equal(r.latents, reference.video.latents)
    assert (r.frames == reference.video.frames).all()


# Measured on this tiny fp32 model (relative L2 of the final latents; mean |frame difference|
# in 8-bit levels): q8_0 0.1% / 0.06, q4_0 2% / 0.8, fp8 e4m3 ~3% / ~1.
QUANTISED = [("gguf", "q8_0", 0.005), ("gguf", "q4_0", 0.05), ("comfyui", "fp8", 0.08)]


@pytest.mark.parametrize(("layout", "quantize", "tol"), QUANTISED)
def test_quantised_conversions_stay_within_their_tolerance(
    tmp_path, sources, reference, layout, quantize, tol
):
    dst = tmp_path / layout
    convert(sources["official"], dst, layout=layout, quantize=quantize)
    r = load_converted(dst, layout, sources["official"]).generate(PROMPT, **RUN)
    err = float((r.latents - reference.video.latents).norm() / reference.video.latents.norm())
    assert 0 < err < tol, err  # really quantised, and close


def test_text_encoder_in_each_layouts_form(tmp_path, sources):
    src = sources["official"]
    official = convert(src, tmp_path / "o", layout="official").files
    assert official["text_encoder"].endswith("models_t5_umt5-xxl-enc-bf16.safetensors")
    assert official["tokenizer"].endswith("google/umt5-xxl")
    assert official["vae"].endswith("Wan2.1_VAE.safetensors")
    diffusers = tmp_path / "d"
    convert(src, diffusers, layout="diffusers")
    index = json.loads((diffusers / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    assert index["tokenizer"][0] == "transformers"
    config = json.loads((diffusers / "text_encoder" / "config.json").read_text())
    assert config["architectures"] == ["UMT5EncoderModel"] and config["num_layers"] == 2
    from transformers import UMT5EncoderModel  # diffusers' own loader reads the folder

    theirs = UMT5EncoderModel.from_pretrained(str(diffusers / "text_encoder"))
    ours = load_pipeline(diffusers, device="cpu", dtype="float32").text_encoder.model
    for name, value in ours.state_dict().items():  # ours runs in bf16, as the release's
        assert torch.equal(theirs.state_dict()[name].to(value.dtype), value), name
    comfy = convert(src, tmp_path / "c", layout="comfyui").files["text_encoder"]
    names = set(SafetensorsFile(comfy))  # ComfyUI's umt5_xxl keys: HF names, one embedding
    assert comfy.endswith("umt5_xxl_fp32.safetensors") and "shared.weight" in names
    assert "encoder.embed_tokens.weight" not in names
    assert "encoder.block.1.layer.0.SelfAttention.q.weight" in names


def test_gguf_files_read_back_with_the_gguf_package(tmp_path, sources):
    from vidmoe.io.gguf import GGUFSource

    out = convert(sources["official"], tmp_path / "g", layout="gguf", quantize="q8_0")
    path = out.files["expert.high_noise"]
    reader, ours = gguf.GGUFReader(path), GGUFSource(path)
    assert reader.fields["general.architecture"].contents() == "wan"
    assert {t.name for t in reader.tensors} == set(ours)
    assert {"Q8_0", "F32"} <= set(ours.types.values())
    assert ours.types["blocks.0.modulation"] == "F32"  # as ComfyUI-GGUF keeps it
    assert "comfy.gguf.orig_shape.patch_embedding.weight" in reader.fields  # 5-D, flattened
    assert ours.shape("patch_embedding.weight") == (96, 16, 1, 2, 2)
    for t in reader.tensors:
        values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(values.flatten(), ours[t.name].flatten()), t.name
    again = convert(path, tmp_path / "back.safetensors", layout="comfyui")  # and onwards
    assert set(SafetensorsFile(again.path)) == {"model.diffusion_model." + n for n in ours}


def test_one_expert_files_convert_between_comfyui_and_gguf(tmp_path, sources, reference):
    folder = convert(sources["official"], tmp_path / "c", layout="comfyui").path
    high = convert(
        folder / "high_noise.safetensors", tmp_path / "g" / "high_noise.gguf", layout="gguf"
    )
    back = convert(high.path, tmp_path / "b" / "high_noise.safetensors", layout="comfyui")
    assert set(high.files) == set(back.files) == {"expert.high_noise"}  # named by the file
    pipe = load_pipeline(
        sources["official"], device="cpu", dtype="float32", experts={"high_noise": back.path}
    )
    assert torch.equal(pipe.generate(PROMPT, **RUN).latents, reference.video.latents)


@pytest.mark.parametrize(
    ("source", "layout", "quantize", "dst", "message"),
    [
        ("official", "gguf", "fp8", "x", "fp8 is ComfyUI's fp8_scaled safetensors, not a GGUF"),
        ("official", "comfyui", "q8_0", "x", "GGUF types .* need --layout gguf"),
        ("official", "gguf", "q4_k", "x", "reads Q4_K files but cannot write them"),
        ("official", "gguf", "q9_9", "x", "'q9_9' is not a GGUF type --layout gguf writes"),
        ("official", "gguf", "tq1_0", "x", "'tq1_0' is not a GGUF type --layout gguf writes"),
        ("official", "onnx", None, "x", "--layout must be one of"),
        ("official", "gguf", None, "x.gguf", "DST must be a folder, not x.gguf"),
        ("demo", "diffusers", None, "x", "built into vidmoe: a diffusers folder holds umT5"),
        ("comfyui-file", "official", None, "x", "converts only to --layout comfyui or gguf"),
    ],
)
def test_what_cannot_be_converted_is_refused(
    tmp_path, sources, source, layout, quantize, dst, message
):
    if source == "comfyui-file":
        folder = convert(sources["official"], tmp_path / "c", layout="comfyui").path
        src = folder / "low_noise.safetensors"
    else:
        src = DEMO_DIR if source == "demo" else sources[source]
    with pytest.raises(ValueError, match=message):
        convert(src, tmp_path / "out" / dst, layout=layout, quantize=quantize)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_the_demo_converts_to_gguf_without_its_built_in_encoder(tmp_path):
    """The demo's VAE leaves its first-frame head behind outside vidmoe's own layout (the
    release VAE has no such tensors), and says so; the vidmoe layout keeps it."""
    from safetensors import safe_open

    out = convert(DEMO_DIR, tmp_path / "g", layout="gguf")
    assert set(out.files) == {"expert.high_noise", "expert.low_noise", "vae"}
    assert "text encoder: 'minilm' is built into vidmoe; no weights to write" in out.notes
    assert len(out.notes) == 2 and any("first-frame head" in n for n in out.notes)
    with safe_open(out.files["vae"], "pt") as f, safe_open(DEMO_DIR / "vae.safetensors", "pt") as d:
        assert set(f.keys()) == {k for k in d.keys() if not k.startswith("first_frame_head.")}
    kept = convert(DEMO_DIR, tmp_path / "v", layout="vidmoe")
    assert not any("first-frame head" in n for n in kept.notes)
    with safe_open(kept.files["vae"], "pt") as f:
        assert any(k.startswith("first_frame_head.") for k in f.keys())
