"""LoRA files in every format: parity with diffusers' loader on a tiny two-expert pipeline with
the same weights, format detection, the vidmoe format, and every bad-input error.

diffusers ignores `.diff` (whole-weight) keys, so those are checked against a hand-merged
reference instead.
"""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from tests.io.lora_files import (
    merged_delta,
    random_lora,
    write_diffusers,
    write_kohya,
    write_release,
)
from vidmoe.io import keymaps
from vidmoe.io.lora_formats import detect_format, parse_lora, read_lora, vidmoe_lora_state_dict
from vidmoe.loading import build_random_pipeline
from vidmoe.models.lora import adaptable_modules

NAMES = ("high_noise", "low_noise")
STEPS = 3
GUIDANCE = {"high_noise": 4.0, "low_noise": 3.0}


@pytest.fixture(scope="module")
def pipe():
    return build_random_pipeline("tiny-t2v")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(3)
    return dict(
        emb=torch.randn(1, 32, 48, generator=g),
        neg=torch.randn(1, 32, 48, generator=g),
        latents=torch.randn(1, 16, 1, 4, 4, generator=g),
    )


@pytest.fixture(autouse=True)
def _unload(pipe):
    yield
    pipe.unload_lora()


def run_ours(pipe, data, sigmas):
    return pipe.generate(
        prompt_embeds=data["emb"][0],
        negative_prompt_embeds=data["neg"][0],
        latents=data["latents"],
        sigmas=sigmas,
        sampler="euler",
        num_frames=1,
        height=32,
        width=32,
        output="latents",
        guidance=GUIDANCE,
    ).latents


def diffusers_pipeline(pipe):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft", reason="diffusers loads LoRAs through peft")
    d = {
        k: v
        for k, v in keymaps.transformer_config_to_diffusers(pipe.config.transformer).items()
        if k != "_class_name"
    }
    models = []
    for name in NAMES:
        m = diffusers.WanTransformer3DModel(**d)
        sd = pipe.experts[name].state_dict()
        m.load_state_dict({keymaps.transformer_to_diffusers(k): v for k, v in sd.items()})
        models.append(m.eval())
    dp = diffusers.WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=models[0],
        transformer_2=models[1],
        boundary_ratio=pipe.config.moe.boundaries[0],
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0),
    )
    dp.set_progress_bar_config(disable=True)
    return dp


def run_diffusers(dp, data):
    out = dp(
        prompt_embeds=data["emb"],
        negative_prompt_embeds=data["neg"],
        latents=data["latents"].clone(),
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE["high_noise"],
        height=32,
        width=32,
        guidance_scale_2=GUIDANCE["low_noise"],
        num_frames=1,
        output_type="latent",
    ).frames
    dp.scheduler.set_timesteps(STEPS)
    return out, tuple(float(s) for s in dp.scheduler.sigmas[:-1])


def loras(pipe):
    high = random_lora(
        pipe.experts["high_noise"], seed=1, diff_b=True, extra=("time_projection.1", "head.head")
    )
    low = random_lora(pipe.experts["low_noise"], seed=2, diff_b=True, extra=("text_embedding.0",))
    return high, low


def write(fmt, path, lora):
    if fmt == "release":
        return write_release(path, lora)
    if fmt == "kohya":  # musubi-tuner writes the block linears only, no bias deltas
        lora = {
            k: {p: v for p, v in e.items() if p != "diff_b"}
            for k, e in lora.items()
            if k.startswith("blocks.")
        }
        return write_kohya(path, lora)
    return write_diffusers(path, {"transformer.": lora})


@pytest.mark.parametrize("fmt", ["release", "kohya", "diffusers"])
@pytest.mark.parametrize("case", ["both", "half", "high_only"])
def test_parity_with_diffusers(pipe, data, tmp_path, fmt, case):
    high, low = loras(pipe)
    f_high, f_low = (
        write(fmt, tmp_path / "high.safetensors", high),
        write(fmt, tmp_path / "low.safetensors", low),
    )
    strength = 0.5 if case == "half" else 1.0
    dp = diffusers_pipeline(pipe)
    base, sigmas = run_diffusers(dp, data)
    dp.load_lora_weights(str(f_high), adapter_name="high")
    dp.transformer.set_adapters(["high"], [strength])
    pipe.load_lora(f_high, expert="high_noise", strength=strength)
    if case != "high_only":
        dp.load_lora_weights(str(f_low), adapter_name="low", load_into_transformer_2=True)
        dp.transformer_2.set_adapters(["low"], [strength])
        pipe.load_lora(f_low, expert="low_noise", strength=strength)
    expected, _ = run_diffusers(dp, data)
    assert pipe.source["adapters"][0]["format"] == fmt
    assert (expected - base).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(run_ours(pipe, data, sigmas), expected, atol=1e-4, rtol=1e-4)


def test_release_diff_keys_match_a_hand_merged_reference(pipe, data, tmp_path):
    """`.diff` (whole-weight delta) + `.diff_b` + LoRA with `lora_A`/`lora_B` spelling, no prefix."""
    g = torch.Generator().manual_seed(5)
    high, _ = loras(pipe)
    mods = dict(pipe.experts["high_noise"].named_modules())
    for name in ("blocks.0.self_attn.q", "blocks.1.ffn.2", "head.head"):
        high[name]["diff"] = torch.randn(mods[name].weight.shape, generator=g) * 0.05
    high["blocks.1.norm3"] = {
        "diff": torch.randn(96, generator=g) * 0.1,
        "diff_b": torch.randn(96, generator=g) * 0.1,
    }
    modulation = torch.randn(1, 6, 96, generator=g) * 0.1  # written as lightx2v's `.diff_m`
    sd = {}
    for name, e in high.items():
        if "A" in e:
            sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = e["A"], e["B"]
            if e["alpha"] is not None:
                sd[f"{name}.alpha"] = torch.tensor(e["alpha"])
        sd.update({f"{name}.{k}": e[k] for k in ("diff", "diff_b") if k in e})
    sd["blocks.0.diff_m"] = modulation
    save_file(sd, str(tmp_path / "d.safetensors"))
    sigmas = (1.0, 0.8, 0.4)
    pipe.load_lora(tmp_path / "d.safetensors", strength=0.7, expert="high_noise")
    assert pipe.source["adapters"][0]["format"] == "release"
    ours = run_ours(pipe, data, sigmas)
    pipe.unload_lora()
    saved = copy.deepcopy(pipe.experts["high_noise"].state_dict())
    with torch.no_grad():
        for name, e in high.items():
            if "A" in e:
                dw, db = merged_delta(e, 0.7)
            else:
                dw, db = 0.7 * e["diff"], 0.7 * e["diff_b"]
            mods[name].weight += dw
            if db is not None:
                mods[name].bias += db
        pipe.experts["high_noise"].blocks[0].modulation += 0.7 * modulation
        ref = run_ours(pipe, data, sigmas)
        pipe.experts["high_noise"].load_state_dict(saved)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_one_diffusers_file_for_both_experts_equals_two_files(pipe, data, tmp_path):
    high, low = loras(pipe)
    both = write_diffusers(
        tmp_path / "both.safetensors", {"transformer.": high, "transformer_2.": low}
    )
    sigmas = (1.0, 0.9, 0.5)
    rec = pipe.load_lora(both, strength=0.6)
    assert rec.strengths == {"high_noise": 0.6, "low_noise": 0.6}
    one = run_ours(pipe, data, sigmas)
    pipe.unload_lora()
    pipe.load_lora(
        write(fmt := "diffusers", tmp_path / "h.safetensors", high),
        expert="high_noise",
        strength=0.6,
    )
    pipe.load_lora(write(fmt, tmp_path / "l.safetensors", low), expert="low_noise", strength=0.6)
    torch.testing.assert_close(run_ours(pipe, data, sigmas), one, atol=0, rtol=0)


def test_vidmoe_format_round_trips(pipe, tmp_path):
    from vidmoe.models.lora import AdapterWeights

    w = {
        "blocks.0.self_attn.q": AdapterWeights(
            down=torch.randn(2, 96), up=torch.randn(96, 2), scale=3.0
        ),
        "blocks.0.norm3": AdapterWeights(diff=torch.randn(96), diff_b=torch.randn(96)),
    }
    save_file(
        vidmoe_lora_state_dict({"low_noise": w}),
        str(tmp_path / "v.safetensors"),
        metadata={"vidmoe_format": "lora/1"},
    )
    rec = pipe.load_lora(tmp_path / "v.safetensors")
    assert rec.format == "vidmoe" and rec.strengths == {"low_noise": 1.0}
    lf = read_lora(
        tmp_path / "v.safetensors",
        modules=adaptable_modules(pipe.experts["high_noise"]),
        expert_names=NAMES,
    )
    got = lf.experts["low_noise"]["blocks.0.self_attn.q"]
    assert got.scale == pytest.approx(3.0) and torch.equal(got.down, w["blocks.0.self_attn.q"].down)
    assert torch.equal(lf.experts["low_noise"]["blocks.0.norm3"].diff_b, w["blocks.0.norm3"].diff_b)


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("transformer.blocks.0.attn1.to_q.lora_A.weight", "diffusers"),
        ("blocks.0.attn2.to_out.0.lora_B.weight", "diffusers"),
        ("base_model.model.blocks.0.ffn.net.0.proj.lora_A.weight", "diffusers"),
        ("diffusion_model.blocks.0.self_attn.q.lora_down.weight", "release"),
        ("model.diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight", "release"),
        ("blocks.0.self_attn.q.diff", "release"),
        ("lora_unet_blocks_0_self_attn_q.lora_down.weight", "kohya"),
        ("high_noise.blocks.0.self_attn.q.lora_A.weight", "vidmoe"),
    ],
)
def test_format_detection(name, fmt):
    assert detect_format([name], {}, NAMES) == fmt


def test_module_names_resolve_in_every_format(pipe):
    modules = adaptable_modules(pipe.experts["high_noise"])
    a, b = torch.zeros(2, 96), torch.zeros(192, 2)
    for prefix, a_key, b_key in [
        ("transformer.blocks.1.ffn.net.0.proj", "lora_A", "lora_B"),
        ("diffusion_model.blocks.1.ffn.0", "lora_down", "lora_up"),
        ("lora_unet_blocks_1_ffn_0", "lora_down", "lora_up"),
    ]:
        lf = parse_lora(
            {f"{prefix}.{a_key}.weight": a, f"{prefix}.{b_key}.weight": b},
            modules=modules,
            expert_names=NAMES,
        )
        assert list(lf.experts[None]) == ["blocks.1.ffn.0"] and not lf.unmatched


# -- errors -----------------------------------------------------------------------------------


def _release_file(tmp_path, extra=None, name="x.safetensors"):
    sd = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, 96),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(96, 4),
        **(extra or {}),
    }
    save_file(sd, str(tmp_path / name))
    return tmp_path / name


def test_unmatched_keys_strict_raises_with_first_ten_and_count(pipe, tmp_path):
    extra = {
        f"diffusion_model.blocks.{i}.cross_attn.k_img.lora_down.weight": torch.zeros(4, 96)
        for i in range(12)
    }
    path = _release_file(tmp_path, extra)
    with pytest.raises(
        ValueError, match=r"12 tensor\(s\) match no module.*\(and 2 more\).*--lora-strict off"
    ):
        pipe.load_lora(path)
    assert pipe.adapters.records == {}
    with pytest.warns(UserWarning, match=r"12 tensor\(s\) match no module"):
        rec = pipe.load_lora(path, strict=False)
    assert rec.num_modules == 1


def test_rank_mismatch_names_both_tensors(pipe, tmp_path):
    path = _release_file(
        tmp_path, {"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(96, 8)}
    )
    with pytest.raises(
        ValueError,
        match=r"ranks of .*lora_down.weight \(4, 96\) and .*lora_up.weight \(96, 8\) disagree",
    ):
        pipe.load_lora(path)


def test_adapter_for_another_model_names_tensor_and_shapes(pipe, tmp_path):
    path = _release_file(
        tmp_path,
        {
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, 5120),
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(5120, 4),
        },
    )
    with pytest.raises(
        ValueError, match=r"lora_down.weight \(4, 5120\).*weight is \(96, 96\).*another model"
    ):
        pipe.load_lora(path)
    path = _release_file(tmp_path, {"diffusion_model.head.head.diff": torch.randn(64, 5120)})
    with pytest.raises(
        ValueError, match=r"head.head.diff has shape \(64, 5120\) but head.head needs \(64, 96\)"
    ):
        pipe.load_lora(path)


def test_truncated_file(pipe, tmp_path):
    path = _release_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        pipe.load_lora(path)


def test_bad_strength_expert_name_and_file(pipe, tmp_path):
    path = _release_file(tmp_path)
    with pytest.raises(ValueError, match="must be a finite number.*'strong'"):
        pipe.load_lora(path, strength="strong")
    with pytest.raises(
        ValueError, match="unknown expert 'mid_noise'; valid experts: high_noise, low_noise"
    ):
        pipe.load_lora(path, expert="mid_noise")
    with pytest.raises(ValueError, match="unknown expert 'dense'"):
        pipe.load_lora(path, strength={"dense": 1.0})
    with pytest.raises(FileNotFoundError):
        pipe.load_lora(tmp_path / "missing.safetensors")
    pipe.load_lora(path)
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora(path)
    with pytest.raises(ValueError, match="must be a finite number"):
        pipe.set_lora_strength("x", float("nan"))
    bad_meta = tmp_path / "m.safetensors"
    save_file(
        {
            "transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 96),
            "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(96, 2),
        },
        str(bad_meta),
        metadata={"lora_adapter_metadata": "{not json"},
    )
    with pytest.raises(ValueError, match="not valid JSON"):
        pipe.load_lora(bad_meta, name="m")


def test_adapter_record_names_file_hash_and_strengths(pipe, tmp_path):
    import hashlib

    path = _release_file(tmp_path)
    pipe.load_lora(path, strength={"high_noise": 0.8, "low_noise": 1.0}, name="style")
    (rec,) = pipe.source["adapters"]
    assert rec["name"] == "style" and rec["file"] == str(path) and rec["format"] == "release"
    assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert rec["strengths"] == {"high_noise": 0.8, "low_noise": 1.0}
    json.dumps(pipe.source)  # JSON-ready for the run's record


def test_pipeline_fuse_unfuse_and_strength(pipe, data, tmp_path):
    high, low = loras(pipe)
    path = write_diffusers(
        tmp_path / "both.safetensors", {"transformer.": high, "transformer_2.": low}
    )
    before = {n: copy.deepcopy(e.state_dict()) for n, e in pipe.experts.items()}
    sigmas = (1.0, 0.9, 0.5)
    pipe.load_lora(path, strength=0.7, name="both")
    unfused = run_ours(pipe, data, sigmas)
    pipe.fuse_lora()
    torch.testing.assert_close(run_ours(pipe, data, sigmas), unfused, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="fused at strength 0.7"):
        pipe.set_lora_strength("both", 0.2)
    pipe.unfuse_lora()
    for n, e in pipe.experts.items():
        assert all(torch.equal(v, before[n][k]) for k, v in e.state_dict().items())
    pipe.set_lora_strength("both", 0.0, expert="low_noise")
    assert pipe.source["adapters"][0]["strengths"] == {"high_noise": 0.7, "low_noise": 0.0}
    pipe.unload_lora("both")
    assert pipe.source["adapters"] == []
