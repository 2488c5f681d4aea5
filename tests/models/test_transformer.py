"""The expert transformer: released layouts, patch round trip, batching and per-token time."""

import pytest
import torch
import torch.nn.functional as F

from vidmoe.config import TransformerConfig
from vidmoe.models.transformer import WanTransformer
from vidmoe.presets import PRESETS, TINY_TRANSFORMER

RELEASED = {"t2v_A14B_expert": "t2v-A14B", "i2v_A14B_expert": "i2v-A14B", "ti2v_5B": "ti2v-5B"}


@pytest.mark.parametrize("entry", sorted(RELEASED))
def test_meta_state_dict_equals_release_layout(layout_fixture, entry):
    ref = layout_fixture[entry]
    cfg = PRESETS[RELEASED[entry]].transformer
    assert TransformerConfig.from_dict(ref["config"]) == cfg
    with torch.device("meta"):
        model = WanTransformer(cfg)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: list(v) for k, v in ref["tensors"].items()}
    assert model.num_params() == ref["num_params"]


def test_a14b_expert_has_14_3b_parameters():
    with torch.device("meta"):
        model = WanTransformer(PRESETS["t2v-A14B"].transformer)
    assert model.num_params() == 14_288_491_584


def _tiny(**kw):
    torch.manual_seed(0)
    cfg = TransformerConfig(**{**TINY_TRANSFORMER.to_dict(), **kw})
    model = WanTransformer(cfg).eval()
    torch.nn.init.normal_(model.head.head.weight, std=0.02)  # the release init zeroes it
    return model


def test_batch_equals_per_sample():
    model = _tiny()
    x = torch.randn(2, 16, 3, 4, 6)
    sigma = torch.tensor([0.9, 0.3])
    ctx = [torch.randn(5, 48), torch.randn(9, 48)]
    with torch.no_grad():
        both = model(x, sigma, ctx)
        one = torch.cat([model(x[i : i + 1], sigma[i : i + 1], [ctx[i]]) for i in range(2)])
    assert both.shape == (2, 16, 3, 4, 6)
    torch.testing.assert_close(both, one, rtol=1e-5, atol=1e-5)


def test_per_token_sigma_equal_to_shared_sigma():
    model = _tiny()
    x = torch.randn(1, 16, 3, 4, 6)
    ctx = [torch.randn(5, 48)]
    num_tokens = 3 * 2 * 3
    with torch.no_grad():
        shared = model(x, torch.tensor([0.4]), ctx)
        per_token = model(x, torch.full((1, num_tokens), 0.4), ctx)
    torch.testing.assert_close(shared, per_token, rtol=1e-6, atol=1e-6)


def test_output_depends_on_text_and_sigma():
    model = _tiny()
    x = torch.randn(1, 16, 1, 4, 4)
    a = model(x, torch.tensor([0.5]), [torch.randn(4, 48)])
    b = model(x, torch.tensor([0.5]), [torch.randn(4, 48)])
    c = model(x, torch.tensor([0.1]), [torch.randn(4, 48)])
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_windowed_attention_limits_receptive_field():
    # one block, window (0, 0): each token only attends to itself, so a change in one token
    # cannot reach another through self-attention (cross-attention and FFN are per-token).
    model = _tiny(num_layers=1, window_size=(0, 0))
    x = torch.randn(1, 16, 1, 4, 4)
    x2 = x.clone()
    x2[:, :, 0, 0:2, 0:2] += 1.0  # change the first token's patch only
    ctx = [torch.randn(4, 48)]
    with torch.no_grad():
        a, b = model(x, torch.tensor([0.5]), ctx), model(x2, torch.tensor([0.5]), ctx)
    changed = (a - b).abs().amax(dim=(0, 1, 2)) > 0  # (H, W)
    assert changed[0:2, 0:2].all() and changed.sum() == 4


def test_bad_inputs_are_clear():
    model = _tiny()
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 20, 1, 4, 4), torch.tensor([0.5]), [torch.randn(4, 48)])
    with pytest.raises(ValueError, match="at most 32"):
        model(torch.randn(1, 16, 1, 4, 4), torch.tensor([0.5]), [torch.randn(40, 48)])
    with pytest.raises(ValueError, match="model_type"):
        TransformerConfig(model_type="video")
    with pytest.raises(ValueError, match=r"latent grid \(1, 5, 4\) .* patch size \(1, 2, 2\)"):
        model(torch.randn(1, 16, 1, 5, 4), torch.tensor([0.5]), [torch.randn(4, 48)])


@pytest.mark.parametrize("patch", [(1, 2, 2), (1, 4, 4), (2, 4, 4)])
def test_patch_embedding_equals_its_conv_and_holds_in_bf16(patch):
    """The patch embedding is the Conv3d's map (fp32, to 1e-5), and stays so under bf16 autocast
    (to bf16 rounding), for every patch: torch 2.13's CPU bf16 convolution with a stride of 4 or
    more returned noise (relative error 1.2), which made a (1, 4, 4) expert train on garbage."""
    model = _tiny(patch_size=patch)
    x = torch.randn(2, 16, 4, 8, 8)
    emb = model.patch_embedding
    want = F.conv3d(x, emb.weight, emb.bias, stride=patch)  # (B, D, f, h, w)
    assert isinstance(emb, torch.nn.Conv3d)  # same parameters, state_dict and LoRA hooks
    torch.testing.assert_close(emb(x), want, atol=1e-5, rtol=1e-5)
    sigma, text = torch.tensor([0.9, 0.3]), torch.randn(2, 8, 48)
    with torch.no_grad():
        full = model(x, sigma, text)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x, sigma, text)
    assert ((half - full).norm() / full.norm()).item() < 0.03


def test_pooled_text_conditions_every_token_and_ignores_padding():
    from vidmoe.models.transformer import pooled_tokens

    plain = _tiny()
    pooled = _tiny(pooled_text=True)
    assert not hasattr(plain, "text_pool") and "text_pool.0.weight" in pooled.state_dict()
    missing = pooled.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert all(k.startswith("text_pool.") for k in missing)
    x, sigma = torch.randn(2, 16, 3, 4, 6), torch.tensor([0.9, 0.3])
    ctx = [torch.randn(5, 48), torch.randn(9, 48)]
    with torch.no_grad():
        # the pooled path starts at zero: the same function as the model without it
        torch.testing.assert_close(pooled(x, sigma, ctx), plain(x, sigma, ctx))
        torch.nn.init.normal_(pooled.text_pool[2].weight, std=0.5)
        a = pooled(x, sigma, ctx)
        # a list of prompts and the zero-padded batch (the training cache's form) agree
        torch.testing.assert_close(a, pooled(x, sigma, pooled.pad_context(ctx)))
        assert (a - plain(x, sigma, ctx)).abs().max() > 1e-3
    padded = pooled.pad_context(ctx)
    torch.testing.assert_close(pooled_tokens(padded), torch.stack([c.mean(0) for c in ctx]))


def test_pooled_text_is_inferred_from_tensor_names():
    from vidmoe.io.layouts import transformer_config_from_shapes

    class Shapes(dict):
        def shape(self, name):
            return list(self[name].shape)

    for flag in (False, True):  # the release's head dim (128) is assumed: dim 256 is 2 heads
        model = _tiny(pooled_text=flag, dim=256, num_heads=2, num_layers=1)
        cfg, _ = transformer_config_from_shapes(Shapes(model.state_dict()))
        assert cfg.pooled_text is flag
