"""Layout detection and writers: each layout, written from tiny release-named weights, is
detected with the right parts and config, and gives back the same tensors under release names."""

import dataclasses

import pytest
import torch

from vidmoe.config import TransformerConfig, VAEConfig
from vidmoe.io import keymaps
from vidmoe.io.checkpoints import load_components, load_expert, load_vae
from vidmoe.io.layouts import detect_layout
from vidmoe.io.writers import (
    write_comfyui_file,
    write_diffusers_layout,
    write_official_layout,
    write_vidmoe_layout,
)
from vidmoe.presets import PRESETS, TINY_TRANSFORMER, TINY_VAE

diffusers = pytest.importorskip("diffusers", reason="diffusers gives the tiny reference shapes")

TINY_VAE_22 = VAEConfig(generation="2.2", dim=16, dec_dim=16, z_dim=48, num_res_blocks=1)
TINY_TI2V = dataclasses.replace(TINY_TRANSFORMER, model_type="ti2v", in_dim=48, out_dim=48)


def random_like_release(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def expert_weights(cfg: TransformerConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under release names, shaped as diffusers' model of `cfg` (mapped back)."""
    d = keymaps.transformer_config_to_diffusers(cfg)
    d.pop("_class_name")
    with torch.device("meta"):
        model = diffusers.WanTransformer3DModel(**d)
    shapes = {keymaps.transformer_to_release(n): t.shape for n, t in model.state_dict().items()}
    return random_like_release(shapes, seed)


def vae_weights(cfg: VAEConfig) -> dict[str, torch.Tensor]:
    d = keymaps.vae_config_to_diffusers(cfg)
    d.pop("_class_name")
    with torch.device("meta"):
        model = diffusers.AutoencoderKLWan(**d)
    to_release = keymaps.vae_renamer(cfg, to_diffusers=False)
    return random_like_release({to_release(n): t.shape for n, t in model.state_dict().items()}, 9)


def same(source, expected):
    return set(source) == set(expected) and all(
        torch.equal(source[k], v) for k, v in expected.items()
    )


@pytest.fixture(scope="module")
def weights():
    return {
        "high_noise": expert_weights(TINY_TRANSFORMER, 1),
        "low_noise": expert_weights(TINY_TRANSFORMER, 2),
    }


def test_official_two_experts_sharded(tmp_path, weights):
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}")
    root = write_official_layout(
        tmp_path / "Wan2.2-T2V-A14B",
        experts=weights,
        transformer=TINY_TRANSFORMER,
        vae=vae_weights(TINY_VAE),
        vae_generation="2.1",
        text_encoder={"x": torch.zeros(1)},
        tokenizer_dir=tokenizer,
        max_shard_bytes=200_000,
    )
    layout = detect_layout(root)
    assert layout.kind == "official" and layout.naming == "release"
    high = layout.experts["high_noise"]
    assert high == root / "high_noise_model" / "diffusion_pytorch_model.safetensors.index.json"
    assert len(list(high.parent.glob("*-of-*.safetensors"))) > 1
    assert layout.vae == root / "Wan2.1_VAE.pth"
    assert layout.text_encoder == root / "models_t5_umt5-xxl-enc-bf16.pth"
    assert layout.tokenizer == root / "google" / "umt5-xxl"
    cfg = layout.config
    assert cfg.transformer == TINY_TRANSFORMER
    assert cfg.vae == TINY_VAE  # inferred from the .pth shapes
    assert cfg.moe.expert_names == ("high_noise", "low_noise") and cfg.moe.boundaries == (0.875,)
    for name, w in weights.items():
        assert same(layout.expert_tensors(name), w)
    assert same(layout.vae_tensors(), vae_weights(TINY_VAE))


def test_official_dense_ti2v_at_top_level(tmp_path):
    w = expert_weights(TINY_TI2V, 3)
    root = write_official_layout(
        tmp_path / "ti2v",
        experts={"dense": w},
        transformer=TINY_TI2V,
        vae=vae_weights(TINY_VAE_22),
        vae_generation="2.2",
    )
    layout = detect_layout(root)
    assert layout.experts == {"dense": root / "diffusion_pytorch_model.safetensors"}
    assert layout.vae == root / "Wan2.2_VAE.pth" and layout.text_encoder is None
    assert layout.config.transformer == TINY_TI2V and layout.config.vae == TINY_VAE_22
    assert layout.config.moe.expert_names == ("dense",) and layout.config.moe.boundaries == ()
    assert same(layout.expert_tensors("dense"), w)


def test_full_size_official_vae_config_is_inferred_from_fixture_shapes(layout_fixture):
    from vidmoe.io.layouts import vae_config_from_shapes

    class Shapes(dict):
        def shape(self, name):
            return tuple(self[name])

    for key, preset in (("vae2_1", "t2v-A14B"), ("vae2_2", "ti2v-5B")):
        cfg, _ = vae_config_from_shapes(Shapes(layout_fixture[key]["tensors"]))
        assert cfg == PRESETS[preset].vae


def test_diffusers_transformer_is_high_noise(tmp_path, weights):
    vae = vae_weights(TINY_VAE)
    root = write_diffusers_layout(
        tmp_path / "diff",
        experts=weights,
        transformer=TINY_TRANSFORMER,
        vae=vae,
        vae_config=TINY_VAE,
        boundary_ratio=0.9,
    )
    layout = detect_layout(root)
    assert layout.kind == "diffusers" and layout.naming == "diffusers"
    assert layout.experts["high_noise"].parent == root / "transformer"
    assert layout.experts["low_noise"].parent == root / "transformer_2"
    assert layout.config.moe.boundaries == (0.9,)
    assert dataclasses.replace(layout.config.transformer, text_len=32) == TINY_TRANSFORMER
    assert layout.config.vae == dataclasses.replace(
        TINY_VAE, latents_mean=(0.0,) * 16, latents_std=(1.0,) * 16
    )
    for name, w in weights.items():
        assert same(layout.expert_tensors(name), w)
    assert same(layout.vae_tensors(), vae)
    # diffusers itself reads what we wrote.
    model = diffusers.WanTransformer3DModel.from_pretrained(root / "transformer")
    assert torch.equal(model.proj_out.weight, weights["high_noise"]["head.head.weight"])
    diffusers.AutoencoderKLWan.from_pretrained(root / "vae")


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", ""])
def test_comfyui_single_file(tmp_path, prefix):
    cfg = TransformerConfig(
        dim=256, num_heads=2, ffn_dim=64, num_layers=2, text_dim=16, freq_dim=32
    )
    w = expert_weights(cfg, 4)
    path = write_comfyui_file(
        w, tmp_path / "wan2.2_t2v_low_noise_14B_fp16.safetensors", prefix=prefix
    )
    layout = detect_layout(path)
    assert layout.kind == "comfyui" and layout.vae is None
    assert layout.experts == {"low_noise": path}
    assert layout.config.transformer == cfg  # num_heads = dim / 128
    assert any("num_heads" in note for note in layout.notes)
    assert same(layout.expert_tensors("low_noise"), w)


def test_comfyui_file_with_foreign_names_is_refused(tmp_path):
    from vidmoe.io.atomic import save_safetensors_atomic

    path = save_safetensors_atomic({"foo.weight": torch.zeros(1)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="Accepted layouts"):
        detect_layout(path)


def test_vidmoe_layout_round_trip(tmp_path, weights):
    config = PRESETS["tiny-t2v"]
    vae = vae_weights(TINY_VAE)
    root = write_vidmoe_layout(tmp_path / "mine", config=config, experts=weights, vae=vae)
    layout = detect_layout(root)
    assert layout.kind == "vidmoe" and layout.config == config
    assert same(layout.expert_tensors("low_noise"), weights["low_noise"])
    assert same(layout.vae_tensors(), vae)
    (root / "experts" / "low_noise.safetensors").unlink()
    with pytest.raises(ValueError, match="low_noise.safetensors"):
        detect_layout(root)


def test_unknown_folder_lists_what_it_found_and_what_is_accepted(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    (tmp_path / "stuff").mkdir()
    with pytest.raises(ValueError) as e:
        detect_layout(tmp_path)
    msg = str(e.value)
    assert "weights.bin" in msg and "stuff/" in msg
    for needed in ("official", "diffusers", "comfyui", "vidmoe", "model_index.json", "vidmoe.json"):
        assert needed in msg
    with pytest.raises(ValueError, match="does not exist"):
        detect_layout(tmp_path / "nope")


def test_official_folder_without_vae_says_which_file(tmp_path, weights):
    root = write_official_layout(
        tmp_path / "o", experts=weights, transformer=TINY_TRANSFORMER, vae={}, vae_generation="2.1"
    )
    (root / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(ValueError, match="Wan2.1_VAE.pth or Wan2.2_VAE.pth"):
        detect_layout(root)


def test_our_modules_load_from_official_and_diffusers_layouts(tmp_path, weights):
    vae = vae_weights(TINY_VAE)
    official = write_official_layout(
        tmp_path / "o", experts=weights, transformer=TINY_TRANSFORMER, vae=vae, vae_generation="2.1"
    )
    diff = write_diffusers_layout(
        tmp_path / "d",
        experts=weights,
        transformer=TINY_TRANSFORMER,
        vae=vae,
        vae_config=TINY_VAE,
        boundary_ratio=0.875,
    )
    for root in (official, diff):
        layout = detect_layout(root)
        expert = load_expert(layout, "low_noise", dtype=torch.float32)
        assert same(expert.state_dict(), weights["low_noise"])
        assert same(load_vae(layout).state_dict(), vae)


def test_load_components_from_vidmoe_layout(tmp_path, weights):
    root = write_vidmoe_layout(
        tmp_path / "m", config=PRESETS["tiny-t2v"], experts=weights, vae=vae_weights(TINY_VAE)
    )
    c = load_components(root, dtype=torch.float32)
    assert c.layout == "vidmoe" and set(c.experts) == {"high_noise", "low_noise"}
    assert same(c.experts["high_noise"].state_dict(), weights["high_noise"])
    assert c.text_encoder is not None


def test_diffusers_dense_ti2v_uses_expand_timesteps(tmp_path):
    w, vae = expert_weights(TINY_TI2V, 5), vae_weights(TINY_VAE_22)
    root = write_diffusers_layout(
        tmp_path / "d", experts={"dense": w}, transformer=TINY_TI2V, vae=vae, vae_config=TINY_VAE_22
    )
    layout = detect_layout(root)
    assert layout.experts == {"dense": root / "transformer" / "diffusion_pytorch_model.safetensors"}
    assert layout.config.transformer.model_type == "ti2v"
    assert layout.config.vae.generation == "2.2" and layout.config.moe.boundaries == ()
    assert same(layout.expert_tensors("dense"), w) and same(layout.vae_tensors(), vae)
