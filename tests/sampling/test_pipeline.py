"""The pipeline end to end on tiny random models: determinism, routing, guidance, conditioning."""

import numpy as np
import pytest
import torch
from PIL import Image

from vidmoe.loading import build_random_pipeline
from vidmoe.presets import get_preset
from vidmoe.sampling.settings import GenerateSettings, resolve_settings


@pytest.fixture(scope="module")
def t2v():
    return build_random_pipeline("tiny-t2v")


def _count_calls(pipe):
    calls = []
    for name, expert in pipe.experts.items():
        expert.register_forward_hook(lambda m, a, o, name=name: calls.append((name, a[0].shape[0])))
    return calls


def test_same_seed_same_video_other_seed_differs(t2v):
    a = t2v.generate("a red circle", num_steps=3, seed=1)
    b = t2v.generate("a red circle", num_steps=3, seed=1)
    c = t2v.generate("a red circle", num_steps=3, seed=2)
    assert a.frames.shape == (9, 64, 64, 3) and a.frames.dtype == np.uint8
    assert np.array_equal(a.frames, b.frames)
    assert not torch.equal(a.latents, c.latents)


def test_trace_routes_by_sigma_and_uses_each_experts_guidance(t2v):
    r = t2v.generate("x", num_steps=8, boundary=0.6, guidance={"high_noise": 5.0, "low_noise": 2.0})
    assert len(r.trace) == 8
    for step in r.trace:
        expected = "high_noise" if step["sigma"] >= 0.6 else "low_noise"
        assert step["experts"] == [expected]
        assert step["guidance"] == [5.0 if expected == "high_noise" else 2.0]


def test_cond_and_uncond_run_as_one_batch_and_guidance_one_skips_uncond(t2v):
    calls = _count_calls(t2v)
    t2v.generate("x", num_steps=4, output="latents")
    assert len(calls) == 4 and all(b == 2 for _, b in calls)
    calls.clear()
    t2v.generate("x", num_steps=4, guidance={"high_noise": 1.0, "low_noise": 1.0}, output="latents")
    assert len(calls) == 4 and all(b == 1 for _, b in calls)
    for expert in t2v.experts.values():
        expert._forward_hooks.clear()


def test_guidance_one_equals_conditional_prediction(t2v):
    emb = t2v.encode_prompt(["a blue square"])[0]
    neg = t2v.encode_prompt(["something else"])[0]
    noise = torch.randn(1, 16, 3, 8, 8)
    g1 = {"high_noise": 1.0, "low_noise": 1.0}
    a = t2v.generate(
        prompt_embeds=emb,
        negative_prompt_embeds=neg,
        latents=noise,
        num_steps=3,
        guidance=g1,
        output="latents",
    )
    b = t2v.generate(
        prompt_embeds=emb,
        negative_prompt_embeds=emb * 0 + 7,
        latents=noise,
        num_steps=3,
        guidance=g1,
        output="latents",
    )
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)


def test_given_latents_and_embeddings_are_used(t2v):
    emb = t2v.encode_prompt(["a"])[0]
    noise = torch.randn(1, 16, 3, 8, 8)
    a = t2v.generate(
        prompt_embeds=emb, negative_prompt_embeds=emb, latents=noise, num_steps=2, output="latents"
    )
    b = t2v.generate(
        prompt_embeds=emb, negative_prompt_embeds=emb, latents=noise, num_steps=2, output="latents"
    )
    c = t2v.generate(
        prompt_embeds=emb,
        negative_prompt_embeds=emb,
        latents=noise + 1,
        num_steps=2,
        output="latents",
    )
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, c.latents)
    with pytest.raises(ValueError, match="latents must have shape"):
        t2v.generate(prompt_embeds=emb, latents=torch.randn(1, 16, 2, 8, 8), num_steps=2)


def test_samplers_all_run(t2v):
    for sampler in ("euler", "unipc", "dpm++"):
        r = t2v.generate("x", num_steps=3, sampler=sampler, output="latents")
        assert torch.isfinite(r.latents).all()


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "first.png"
    rgb = np.zeros((40, 56, 3), np.uint8)
    rgb[:, :28] = (255, 0, 0)
    Image.fromarray(rgb).save(path)
    return str(path)


def test_i2v_needs_an_image_and_runs_with_one(image_file):
    pipe = build_random_pipeline("tiny-i2v")
    with pytest.raises(ValueError, match="image-to-video model: give an image"):
        pipe.generate("x", num_steps=2)
    r = pipe.generate("x", num_steps=2, image=image_file)
    assert r.frames.shape == (9, 48, 64, 3)  # the 56x40 image at 64*64 pixels (the release's rule)


def test_ti2v_keeps_the_first_latent_frame(image_file):
    pipe = build_random_pipeline("tiny-ti2v")
    r = pipe.generate("x", num_steps=3, image=image_file, output="latents")
    from vidmoe.sampling.conditioning import load_image_cropped

    # the 56x40 image at 64*64 pixels: the release's ti2v rule picks 64x64, covered and cropped
    assert (r.settings.width, r.settings.height, r.settings.area) == (64, 64, 4096)
    first = pipe.vae.encode(load_image_cropped(image_file, 64, 64))
    torch.testing.assert_close(r.latents[:, :, :1], first, rtol=0, atol=0)
    assert r.latents.shape == (1, 48, 3, 4, 4)


BAD = [
    (dict(num_frames=80), "num_frames must be 4k\\+1.*got 80: use 77 or 81"),
    (dict(width=100), "width must be a positive multiple of 16"),
    (dict(num_steps=0), "num_steps must be an integer >= 1"),
    (dict(boundary=1.5), "boundary must lie in \\(0, 1\\)"),
    (dict(boundary="sometimes"), "boundary must be one of"),
    (dict(guidance={"high_noise": -1.0}), "guidance for high_noise must be a number >= 0"),
    (
        dict(guidance={"mid_noise": 2.0}),
        "unknown expert 'mid_noise'.*valid experts: high_noise, low_noise",
    ),
    (dict(guidance=(5.0,)), "one scale per expert \\(high_noise, low_noise\\): 2 numbers; got 1"),
    (dict(guidance="5"), "guidance must be a dict"),
    (dict(sampler="ddim"), "unknown sampler 'ddim'"),
    (dict(shift=0), "shift must be > 0"),
]


@pytest.mark.parametrize(
    "kwargs,message", BAD, ids=[next(iter(k)) + str(i) for i, (k, _) in enumerate(BAD)]
)
def test_bad_settings_are_clear(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_settings(GenerateSettings(prompt="x", **kwargs), get_preset("tiny-t2v"))


@pytest.mark.parametrize(
    "guidance,expected",
    [
        ((6.0, 2.5), {"high_noise": 6.0, "low_noise": 2.5}),
        (3.0, {"high_noise": 3.0, "low_noise": 3.0}),
        ({"low_noise": 1.5}, None),
    ],
)
def test_guidance_as_sequence_number_or_dict(guidance, expected):
    model = get_preset("tiny-t2v")
    rs = resolve_settings(GenerateSettings(prompt="x", guidance=guidance), model)
    if expected is None:  # a dict changes only the experts it names
        expected = {"high_noise": model.moe.guidance[0], "low_noise": 1.5}
    assert rs.guidance == expected


def test_unknown_size_for_a_released_model():
    with pytest.raises(
        ValueError, match="size 1024x1024 is not supported by t2v-A14B; supported: 1280x720"
    ):
        resolve_settings(GenerateSettings(width=1024, height=1024), get_preset("t2v-A14B"))


def test_empty_prompt_is_an_unconditional_request(t2v):
    rs = resolve_settings(GenerateSettings(prompt=""), get_preset("tiny-t2v"))
    assert rs.prompt == ""
    assert t2v.generate("", num_steps=2, output="latents").latents.shape == (1, 16, 3, 8, 8)


def test_pipeline_holds_one_experts_object_and_swap_gives_the_same_video(t2v):
    from vidmoe.models.moe import Experts, Placement
    from vidmoe.sampling.pipeline import Pipeline

    assert isinstance(t2v.experts, Experts) and list(t2v.experts) == ["high_noise", "low_noise"]
    counts = t2v.experts.param_counts()
    assert t2v.num_params() == {"total": counts.total, "active": counts.active, **counts.per_expert}
    swap = Experts(dict(t2v.experts.items()), t2v.config.moe, placement=Placement(residency="swap"))
    other = Pipeline(t2v.config, swap, t2v.vae, t2v.text_encoder)
    assert other.residency == "swap" and other.experts["low_noise"] is t2v.experts["low_noise"]
    a = t2v.generate("x", num_steps=3, seed=4, output="latents")
    b = other.generate("x", num_steps=3, seed=4, output="latents")
    assert torch.equal(a.latents, b.latents)
    with pytest.raises(ValueError, match="come from the Experts' placement"):
        Pipeline(t2v.config, swap, t2v.vae, t2v.text_encoder, device="cpu")
    with pytest.raises(ValueError, match="output must be one of frames, latents; got 'mp4'"):
        t2v.generate("x", num_steps=1, output="mp4")
