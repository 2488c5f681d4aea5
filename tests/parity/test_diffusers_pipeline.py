"""End-to-end parity with diffusers' WanPipeline, and between the release and diffusers layouts.

The same tiny random two-expert model is written in diffusers' folder layout and in the release's;
diffusers and vidmoe load it, get the same prompt embeddings, initial latents, boundary and two
guidance scales, and sample with Euler. Tolerance: 1e-4 relative (float32).
"""

import pytest
import torch

from tests.checkpoints import write_tiny_diffusers, write_tiny_official
from vidmoe.loading import load_pipeline

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is the second reference (test extra)"
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return write_tiny_diffusers(root / "diffusers"), write_tiny_official(root / "official")


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_final_latents_match_diffusers_wan_pipeline(folders):
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    root = folders[0]
    shift, steps, boundary = 12.0, 6, 0.875
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=AutoencoderKLWan.from_pretrained(root / "vae"),
        scheduler=scheduler,
        transformer=WanTransformer3DModel.from_pretrained(root / "transformer"),
        transformer_2=WanTransformer3DModel.from_pretrained(root / "transformer_2"),
        boundary_ratio=boundary,
    )
    g = torch.Generator().manual_seed(0)
    emb, neg = torch.randn(1, 7, 48, generator=g), torch.randn(1, 5, 48, generator=g)
    latents = torch.randn(1, 16, 3, 8, 8, generator=g)
    pad = lambda e: torch.cat([e, e.new_zeros(1, 512 - e.shape[1], 48)], dim=1)  # noqa: E731
    want = ref(
        prompt_embeds=pad(emb),
        negative_prompt_embeds=pad(neg),
        latents=latents.clone(),
        height=64,
        width=64,
        num_frames=9,
        num_inference_steps=steps,
        guidance_scale=4.0,
        guidance_scale_2=2.5,
        output_type="latent",
    ).frames

    scheduler.set_timesteps(steps)
    sigmas = tuple(float(s) for s in scheduler.sigmas[:-1])
    pipe = load_pipeline(root, dtype="float32", device="cpu")
    got = pipe.generate(
        prompt_embeds=emb[0],
        negative_prompt_embeds=neg[0],
        latents=latents,
        width=64,
        height=64,
        num_frames=9,
        sigmas=sigmas,
        sampler="euler",
        boundary=boundary,
        guidance={"high_noise": 4.0, "low_noise": 2.5},
        output="latents",
    )
    assert [s["experts"][0] for s in got.trace].count("high_noise") not in (
        0,
        steps,
    )  # both experts ran
    assert _rel(got.latents, want) < 1e-4


def test_official_and_diffusers_layouts_give_the_same_video(folders):
    a = load_pipeline(folders[0], dtype="float32", device="cpu")
    b = load_pipeline(folders[1], dtype="float32", device="cpu")
    assert (a.source["layout"], b.source["layout"]) == ("diffusers", "official")
    kw = dict(width=64, height=64, num_frames=9, num_steps=3, seed=5)
    ra, rb = (
        a.generate("a red circle moving to the right", **kw),
        b.generate("a red circle moving to the right", **kw),
    )
    torch.testing.assert_close(ra.latents, rb.latents, rtol=1e-5, atol=1e-5)
    assert (ra.frames == rb.frames).all()
