"""Asymmetric experts: per-expert architecture overrides, from the config to a trained, exported,
loaded and sampled model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.training.conftest import TINY_EXPERT, TINY_MOE, HashTextEncoder, PoolVAE, fake_clips
from vidmoe.config import ModelConfig, VAEConfig
from vidmoe.models.transformer import WanTransformer
from vidmoe.presets import PRESETS
from vidmoe.training.loop import TrainConfig, load_train_config

OVERRIDES = {"high_noise": {"num_layers": 2}, "low_noise": {"window_size": [1, 1], "ffn_dim": 32}}


def _model(**overrides) -> ModelConfig:
    return dataclasses.replace(
        PRESETS["tiny-t2v"],
        transformer=TINY_EXPERT,
        moe=TINY_MOE,
        vae=VAEConfig(generation="2.1", dim=4, z_dim=4, num_res_blocks=1),
        **overrides,
    )


def test_overrides_round_trip_through_json_with_equality_and_hash():
    config = _model(expert_overrides=OVERRIDES)
    back = ModelConfig.from_json(config.to_json())
    assert back == config and hash(back) == hash(config)
    assert back.transformer_for("low_noise").window_size == (1, 1)
    # the same overrides given in another order (and as tuples) are the same config
    reordered = {
        "low_noise": {"ffn_dim": 32, "window_size": (1, 1)},
        "high_noise": {"num_layers": 2},
    }
    assert _model(expert_overrides=reordered) == config
    assert _model() != config and _model().expert_overrides == ()
    # a config written before expert_overrides existed still loads, symmetric
    text = _model().to_json()
    assert '"expert_overrides": {}' in text
    old = text.replace('"expert_overrides": {}', '"_": 0')
    assert ModelConfig.from_json(old) == _model()


def test_transformer_for_applies_overrides_and_shares_the_rest():
    config = _model(expert_overrides=OVERRIDES)
    low, high = config.transformer_for("low_noise"), config.transformer_for("high_noise")
    assert (low.ffn_dim, low.window_size, low.num_layers) == (32, (1, 1), 1)
    assert (high.ffn_dim, high.window_size, high.num_layers) == (64, (-1, -1), 2)
    assert dataclasses.replace(low, ffn_dim=64, window_size=(-1, -1)) == TINY_EXPERT
    assert _model().transformer_for("high_noise") == TINY_EXPERT


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"mid_noise": {"ffn_dim": 32}}, r"unknown experts \['mid_noise'\]"),
        ({"low_noise": {"ffn_width": 32}}, r"unknown TransformerConfig fields \['ffn_width'\]"),
        ({"low_noise": {"in_dim": 8}}, r"sets \['in_dim'\], which every expert must share"),
        ({"high_noise": {"text_len": 16, "dim": 64}}, r"sets \['text_len'\]"),
        ({"low_noise": {"num_heads": 3}}, r"expert_overrides\['low_noise'\].*divisible"),
    ],
)
def test_bad_overrides_raise_clear_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        _model(expert_overrides=overrides)
    with pytest.raises(ValueError, match=match):
        TrainConfig(
            cache="c",
            out_dir="o",
            transformer=TINY_EXPERT,
            moe=TINY_MOE,
            expert_overrides=overrides,
        )


def test_transformer_for_rejects_unknown_expert():
    with pytest.raises(ValueError, match=r"unknown expert 'dense'"):
        _model().transformer_for("dense")


def test_train_config_reads_overrides_from_toml(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text(
        'cache = "c"\nout_dir = "o"\n[transformer]\nin_dim = 4\nout_dim = 4\ndim = 32\n'
        "num_heads = 2\n[expert_overrides.low_noise]\nffn_dim = 512\nwindow_size = [-1, 4]\n"
    )
    cfg = load_train_config(path)
    assert cfg.transformer_for("low_noise").ffn_dim == 512
    assert cfg.transformer_for("low_noise").window_size == (-1, 4)
    assert cfg.transformer_for("high_noise") == cfg.transformer
    assert cfg.to_dict()["expert_overrides"] == {
        "low_noise": {"ffn_dim": 512, "window_size": (-1, 4)}
    }
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_asymmetric_run_trains_exports_loads_and_generates(tmp_path):
    from vidmoe.io.checkpoints import detect_layout
    from vidmoe.loading import describe_model, expert_param_counts, load_pipeline
    from vidmoe.models.vae import WanVAE
    from vidmoe.training.checkpoint import export_model
    from vidmoe.training.data import build_latent_cache
    from vidmoe.training.loop import train

    build_latent_cache(fake_clips(4), PoolVAE(), HashTextEncoder(), tmp_path / "c", text_len=8)
    cfg = TrainConfig(
        cache=str(tmp_path / "c"),
        out_dir=str(tmp_path / "run"),
        transformer=TINY_EXPERT,
        moe=TINY_MOE,
        expert_overrides=OVERRIDES,
        batch_size=2,
        max_steps=2,
        warmup_steps=1,
        num_threads=1,
        use_progress=False,
    )
    trainer = train(cfg)
    assert trainer.step == 2
    assert trainer.experts["low_noise"].config.window_size == (1, 1)
    config = _model(expert_overrides=OVERRIDES)
    vae = WanVAE(config.vae).state_dict()
    ckpt = tmp_path / "run" / "checkpoint.pt"
    with pytest.raises(ValueError, match=r"'high_noise'.*num_layers 2 \(config: 1\)"):
        export_model(ckpt, _model(), vae, tmp_path / "wrong")
    out = export_model(ckpt, config, vae, tmp_path / "m", dtype=torch.float32)
    assert detect_layout(out).config == config

    pipe = load_pipeline(out, device="cpu", dtype="float32")
    low, high = pipe.experts["low_noise"], pipe.experts["high_noise"]
    assert low.config.window_size == (1, 1) and low.blocks[0].ffn[0].weight.shape == (32, 32)
    assert len(high.blocks) == 2 and high.blocks[0].ffn[0].weight.shape == (64, 32)
    # counts from configs built here by hand, not through transformer_for
    want = {
        "high_noise": WanTransformer(dataclasses.replace(TINY_EXPERT, num_layers=2)).num_params(),
        "low_noise": WanTransformer(dataclasses.replace(TINY_EXPERT, ffn_dim=32)).num_params(),
    }
    assert want["high_noise"] > want["low_noise"]
    assert {n: e.num_params() for n, e in pipe.experts.items()} == want
    assert expert_param_counts(config) == want
    for name, expert in pipe.experts.items():  # the exported EMA weights, bit for bit
        for k, v in trainer.ema.shadow[name].items():
            assert torch.equal(expert.state_dict()[k], v), (name, k)

    # the window changes the low-noise expert's output (so it is really applied)
    x, sigma = torch.randn(1, 4, 2, 4, 4), torch.tensor([0.3])
    text = HashTextEncoder().encode(["a red square"])
    glob = WanTransformer(dataclasses.replace(low.config, window_size=(-1, -1))).eval()
    glob.load_state_dict(low.state_dict())
    with torch.no_grad():
        assert not torch.allclose(low(x, sigma, text), glob(x, sigma, text), atol=1e-6)

    embeds = HashTextEncoder().encode(["a red square", ""])
    result = pipe.generate(
        width=32,
        height=32,
        num_frames=5,
        num_steps=4,
        sampler="euler",
        seed=0,
        prompt_embeds=embeds[0],
        negative_prompt_embeds=embeds[1],
    )
    assert result.frames.shape == (5, 32, 32, 3)
    assert {n for step in result.trace for n in step["experts"]} == {"high_noise", "low_noise"}

    info = describe_model(out)
    total = f"{want['high_noise'] + want['low_noise']:,}"
    assert f"({total}) total" in info and f"({want['high_noise']:,}) active per step" in info
    assert "per expert: high_noise " in info and f"({want['low_noise']:,})" in info
    assert "low_noise differs: ffn_dim 32, window_size (1, 1)" in info


# A coarse-patched high-noise expert (layout) and a fine-patched low-noise one (detail); the
# wider high-noise expert keeps its head able to output a whole 4x4 patch (64 values).
PATCH_OVERRIDES = {"high_noise": {"patch_size": [1, 4, 4], "dim": 64}}


def test_experts_with_different_patches_train_export_load_and_generate(tmp_path):
    from vidmoe.loading import load_pipeline
    from vidmoe.models.vae import WanVAE
    from vidmoe.training.checkpoint import export_model
    from vidmoe.training.data import build_latent_cache
    from vidmoe.training.loop import train

    build_latent_cache(fake_clips(4), PoolVAE(), HashTextEncoder(), tmp_path / "c", text_len=8)
    cfg = TrainConfig(
        cache=str(tmp_path / "c"),
        out_dir=str(tmp_path / "run"),
        transformer=TINY_EXPERT,
        moe=TINY_MOE,
        expert_overrides=PATCH_OVERRIDES,
        batch_size=4,
        max_steps=2,
        warmup_steps=1,
        num_threads=1,
        use_progress=False,
    )
    trainer = train(cfg)
    high, low = trainer.experts["high_noise"], trainer.experts["low_noise"]
    assert high.patch_embedding.weight.shape == (64, 4, 1, 4, 4)
    assert low.patch_embedding.weight.shape == (32, 4, 1, 2, 2)
    assert all(p.grad is not None for e in (high, low) for p in e.parameters())  # both trained

    config = _model(expert_overrides=PATCH_OVERRIDES)
    stride = config.vae.spatial_stride
    assert (config.size_multiple, _model().size_multiple) == (4 * stride, 2 * stride)
    out = export_model(
        tmp_path / "run" / "checkpoint.pt",
        config,
        WanVAE(config.vae).state_dict(),
        tmp_path / "m",
        dtype=torch.float32,
    )
    pipe = load_pipeline(out, device="cpu", dtype="float32")
    assert pipe.experts["high_noise"].config.patch_size == (1, 4, 4)
    assert pipe.experts["low_noise"].config.patch_size == (1, 2, 2)
    embeds = HashTextEncoder().encode(["a red square", ""])
    result = pipe.generate(
        width=32,
        height=32,
        num_frames=5,
        num_steps=4,
        sampler="euler",
        seed=0,
        prompt_embeds=embeds[0],
        negative_prompt_embeds=embeds[1],
    )
    assert result.frames.shape == (5, 32, 32, 3) and torch.isfinite(result.latents).all()
    assert {n for step in result.trace for n in step["experts"]} == {"high_noise", "low_noise"}
    # 48 pixels is a whole number of the low-noise expert's patches but not of the high-noise one's
    with pytest.raises(
        ValueError, match=rf"width must be a positive multiple of {4 * stride}.*got 48"
    ):
        pipe.generate(
            width=48,
            height=32,
            num_frames=5,
            num_steps=2,
            prompt_embeds=embeds[0],
            negative_prompt_embeds=embeds[1],
        )
