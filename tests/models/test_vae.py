"""The causal VAE: released layouts, causality, chunked == one-pass, streaming, input errors."""

import dataclasses

import pytest
import torch

from vidmoe.config import VAEConfig
from vidmoe.models.vae import CausalCache, WanVAE
from vidmoe.presets import TINY_VAE, VAE_2_1, VAE_2_2

TINY = {
    "2.1": (VAEConfig(generation="2.1", dim=8, z_dim=4, num_res_blocks=1), 16),
    "2.2": (VAEConfig(generation="2.2", dim=8, dec_dim=8, z_dim=4, num_res_blocks=1), 32),
}


def _tiny(generation):
    torch.manual_seed(0)
    cfg, size = TINY[generation]
    model = WanVAE(cfg).eval()
    for m in model.modules():  # the init zeroes attention outputs; make every path count
        if hasattr(m, "proj"):
            torch.nn.init.normal_(m.proj.weight, std=0.1)
    video = torch.rand(1, 3, 9, size, size) * 2 - 1
    return model, video


@pytest.mark.parametrize("entry, cfg", [("vae2_1", VAE_2_1), ("vae2_2", VAE_2_2)])
def test_meta_state_dict_equals_release_layout(layout_fixture, entry, cfg):
    ref = layout_fixture[entry]
    with torch.device("meta"):
        model = WanVAE(cfg)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: list(v) for k, v in ref["tensors"].items()}
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]


@pytest.mark.parametrize("generation", ["2.1", "2.2"])
def test_encode_shapes_and_causal_prefix(generation):
    model, video = _tiny(generation)
    with torch.no_grad():
        whole = model.encode(video)
        prefix = model.encode(video[:, :, :5])
    stride = model.config.spatial_stride
    assert whole.shape == (1, 4, 3, video.shape[3] // stride, video.shape[4] // stride)
    torch.testing.assert_close(prefix, whole[:, :, :2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("generation", ["2.1", "2.2"])
def test_decode_shapes_and_causal_prefix(generation):
    model, video = _tiny(generation)
    latent = torch.randn(1, 4, 3, *model.encode(video).shape[3:])
    with torch.no_grad():
        whole = model.decode(latent, clamp=False)
        prefix = model.decode(latent[:, :, :2], clamp=False)
    assert whole.shape == video.shape
    torch.testing.assert_close(prefix, whole[:, :, :5], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("generation", ["2.1", "2.2"])
def test_chunked_equals_one_pass(generation):
    model, video = _tiny(generation)
    with torch.no_grad():
        latent = model.encode(video)
        torch.testing.assert_close(model.encode(video, chunked=False), latent, rtol=1e-5, atol=1e-5)
        chunked = model.decode(latent, clamp=False)
        one_pass = model.decode(latent, chunked=False, clamp=False)
    torch.testing.assert_close(one_pass, chunked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("generation", ["2.1", "2.2"])
def test_streaming_with_an_explicit_cache_equals_whole_clip(generation):
    model, video = _tiny(generation)
    enc, dec = CausalCache(), CausalCache()
    with torch.no_grad():
        latent = model.encode(video)
        pieces = [
            model.encode(video[:, :, :5], cache=enc),
            model.encode(video[:, :, 5:], cache=enc),
        ]
        decoded = model.decode(latent, clamp=False)
        out = [model.decode(latent[:, :, :1], cache=dec, clamp=False)]
        out.append(model.decode(latent[:, :, 1:], cache=dec, chunked=False, clamp=False))
    torch.testing.assert_close(torch.cat(pieces, dim=2), latent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(out, dim=2), decoded, rtol=1e-5, atol=1e-5)
    assert enc.num_chunks == 3 and dec.num_chunks == 2
    with pytest.raises(ValueError, match="fresh CausalCache"):
        model.decode(latent, cache=enc)


def test_latents_are_normalised_with_the_config_or_given_scale():
    model, video = _tiny("2.1")
    mean, std = torch.randn(4), torch.rand(4) + 0.5
    with torch.no_grad():
        raw = model.encode(video)  # tiny config: empty mean/std mean zeros/ones
        scaled = model.encode(video, scale=(mean, std))
        back = model.decode(scaled, scale=(mean, std), clamp=False)
        clamped = model.decode(scaled, scale=(mean, std))
    view = (1, 4, 1, 1, 1)
    torch.testing.assert_close(scaled, (raw - mean.view(view)) / std.view(view))
    torch.testing.assert_close(back, model.decode(raw, clamp=False), rtol=1e-5, atol=1e-5)
    assert clamped.abs().max() <= 1.0


def test_bad_inputs_raise_clear_errors():
    model, video = _tiny("2.1")
    with pytest.raises(ValueError, match=r"num_frames must be 4k\+1 .* got 8: use 5 or 9"):
        model.encode(video[:, :, :8])
    with pytest.raises(ValueError, match="height must be divisible by 8 .* got 12: use 8 or 16"):
        model.encode(video[:, :, :, :12])
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        model.encode(video[0])
    cache = CausalCache()
    model.encode(video[:, :, :1], cache=cache)
    with pytest.raises(ValueError, match="multiple of 4 frames .* got 3: use 4"):
        model.encode(video[:, :, :3], cache=cache)
    with pytest.raises(ValueError, match=r"latent must be \(B, 4, F>=1"):
        model.decode(torch.zeros(1, 16, 1, 2, 2))
    with pytest.raises(ValueError, match="4 values"):
        model.encode(video, scale=(torch.zeros(3), torch.ones(3)))
    with pytest.raises(ValueError, match="attn_scales must be empty"):
        WanVAE(VAEConfig(generation="2.2", dim=8, z_dim=4, attn_scales=(1.0,)))


@pytest.mark.parametrize("generation", ["2.1", "2.2"])
def test_first_frame_head_redraws_frame_0_from_latents_0_and_1_only(generation):
    """The first-frame head (issue 23): at its init the decode is the head-less VAE's, bit for
    bit; trained (here: random), it changes frame 0 alone, reads latent frame 1, streams like
    the whole clip when the first piece holds two latents, and is refused with a bad width."""
    model, video = _tiny(generation)
    config = dataclasses.replace(model.config, first_frame_head=8)
    headed = WanVAE(config).eval()
    headed.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        latent = model.encode(video)
        plain = model.decode(latent, clamp=False)
        assert torch.equal(headed.decode(latent, clamp=False), plain)
        for p in headed.first_frame_head.pixel[-1].parameters():
            torch.nn.init.normal_(p, std=0.1)
        out = headed.decode(latent, clamp=False)
        moved = latent.clone()
        moved[:, :, 1] += 1.0
        out_moved = headed.decode(moved, clamp=False)
        dec = CausalCache()
        pieces = [headed.decode(latent[:, :, :2], cache=dec, clamp=False)]
        pieces.append(headed.decode(latent[:, :, 2:], cache=dec, clamp=False))
    assert torch.equal(out[:, :, 1:], plain[:, :, 1:])
    assert (out[:, :, 0] - plain[:, :, 0]).abs().max() > 1e-3
    assert (out_moved[:, :, 0] - out[:, :, 0]).abs().max() > 1e-4
    torch.testing.assert_close(torch.cat(pieces, dim=2), out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"first_frame_head must be an integer in \[0, 4096\]"):
        dataclasses.replace(config, first_frame_head=-1)


def test_a_head_of_five_frames_redraws_latent_frame_1s_frames_too_and_nothing_after():
    """`first_frame_head_frames = 5`: frames 0-4 (latents 0 and 1) redrawn together (frames 1-4
    by a correction smooth at the latent grid's scale), frames 5+ the head-less decode's bytes;
    a stream whose first piece holds two latents equals the whole clip; a one-latent clip
    decodes (its frame repeated for the head); a count beyond latent frame 1's frames is refused
    with the range."""
    model, video = _tiny("2.1")
    config = dataclasses.replace(model.config, first_frame_head=8, first_frame_head_frames=5)
    headed = WanVAE(config).eval()
    headed.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        latent = model.encode(video)
        plain = model.decode(latent, clamp=False)
        assert torch.equal(headed.decode(latent, clamp=False), plain)  # the identity at init
        for p in headed.first_frame_head.pixel[-1].parameters():
            torch.nn.init.normal_(p, std=0.1)
        out = headed.decode(latent, clamp=False)
        dec = CausalCache()
        pieces = [headed.decode(latent[:, :, :2], cache=dec, clamp=False)]
        pieces.append(headed.decode(latent[:, :, 2:], cache=dec, clamp=False))
        one = headed.decode(latent[:, :, :1], clamp=False)
    assert latent.shape[2] >= 3 and out.shape[2] > 5
    assert torch.equal(out[:, :, 5:], plain[:, :, 5:])
    delta = out[:, :, :5] - plain[:, :, :5]  # (1, 3, 5, H, W)
    roughness = (delta[..., 1:] - delta[..., :-1]).abs().mean(dim=(0, 1, 3, 4))  # (5,)
    for t in range(5):
        assert delta[:, :, t].abs().max() > 1e-3, t
    # frame 0 corrected pixel by pixel; frames 1-4 by a colour shift smooth at the latent scale
    assert (roughness[1:] < 0.3 * roughness[0]).all(), roughness
    torch.testing.assert_close(torch.cat(pieces, dim=2), out, rtol=1e-5, atol=1e-5)
    assert one.shape[2] == 1 and (one[:, :, 0] - plain[:, :, 0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"first_frame_head_frames must be an integer in \[1, 5\]"):
        dataclasses.replace(config, first_frame_head_frames=6)


def test_a_head_edge_band_keeps_the_later_frames_correction_per_pixel_at_the_border_only():
    """`first_frame_head_edge = 1`: frames 1-4's correction is per pixel in the outermost rows
    and columns (where the decoder's zero padding acts) and the smooth one inside; frame 0 and
    frames 5+ as with no band. A band out of range is refused with the range."""
    model, video = _tiny("2.1")
    config = dataclasses.replace(model.config, first_frame_head=8, first_frame_head_frames=5)
    smooth = WanVAE(config).eval()
    smooth.load_state_dict(model.state_dict(), strict=False)
    torch.manual_seed(1)
    for p in smooth.first_frame_head.pixel[-1].parameters():
        torch.nn.init.normal_(p, std=0.1)
    banded = WanVAE(dataclasses.replace(config, first_frame_head_edge=1)).eval()
    banded.load_state_dict(smooth.state_dict())
    with torch.no_grad():
        latent = model.encode(video)
        plain = model.decode(latent, clamp=False)
        a, b = smooth.decode(latent, clamp=False), banded.decode(latent, clamp=False)
    assert torch.equal(a[:, :, :1], b[:, :, :1]) and torch.equal(a[:, :, 5:], b[:, :, 5:])
    assert torch.equal(a[:, :, 1:5, 1:-1, 1:-1], b[:, :, 1:5, 1:-1, 1:-1])  # inside: smooth
    border = torch.ones(a.shape[-2:], dtype=torch.bool)
    border[1:-1, 1:-1] = False
    rough = lambda d: (d[..., 1:] - d[..., :-1]).abs().mean()  # noqa: E731
    delta_a, delta_b = (x[:, :, 1:5, 0] - plain[:, :, 1:5, 0] for x in (a, b))  # the top row
    assert (a - b)[:, :, 1:5][..., border].abs().max() > 1e-4  # the band: per pixel
    assert rough(delta_b) > 2 * rough(delta_a), (rough(delta_b), rough(delta_a))
    with pytest.raises(ValueError, match=r"first_frame_head_edge must be an integer in \[0, 64\]"):
        dataclasses.replace(config, first_frame_head_edge=-1)


def test_tiny_preset_and_attention_levels_build_and_stay_causal():
    torch.manual_seed(0)
    assert WanVAE.from_config(TINY_VAE).config is TINY_VAE
    model = WanVAE(
        VAEConfig(generation="2.1", dim=8, z_dim=4, num_res_blocks=1, attn_scales=(0.5,))
    )
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        whole, prefix = model.encode(video), model.encode(video[:, :, :1])
        decoded = model.decode(whole, clamp=False)
    assert any("downsamples.3.norm" in k for k in model.state_dict())  # attention after level 1
    torch.testing.assert_close(prefix, whole[:, :, :1], rtol=1e-5, atol=1e-5)
    assert decoded.shape == video.shape
