"""Name maps between release, diffusers and ComfyUI checkpoints, and the config conversions.

The maps are checked three ways: names round-trip; diffusers models (full size on meta, against
the release checkpoints' name/shape fixture) map onto release names exactly; and the golden
reference weights, renamed into tiny diffusers models, reproduce the reference outputs.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import GOLDEN_DIR
from vidmoe.config import VAEConfig
from vidmoe.io import keymaps
from vidmoe.io.checkpoints import load_into
from vidmoe.io.tensors import DictSource, RenamedSource
from vidmoe.presets import PRESETS, TINY_TRANSFORMER, TINY_VAE, VAE_2_1, VAE_2_2

diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference for the maps")

TINY_VAE_22 = VAEConfig(generation="2.2", dim=16, dec_dim=16, z_dim=48, num_res_blocks=1)
EXPERTS = {"t2v_A14B_expert": "t2v-A14B", "i2v_A14B_expert": "i2v-A14B", "ti2v_5B": "ti2v-5B"}


def diffusers_transformer(cfg, device="cpu"):
    d = keymaps.transformer_config_to_diffusers(cfg)
    d.pop("_class_name")
    with torch.device(device):
        return diffusers.WanTransformer3DModel(**d)


def diffusers_vae(cfg, device="cpu"):
    d = keymaps.vae_config_to_diffusers(cfg)
    d.pop("_class_name")
    with torch.device(device):
        return diffusers.AutoencoderKLWan(**d)


def shapes(module, rename=lambda n: n):
    return {rename(n): list(t.shape) for n, t in module.state_dict().items()}


@pytest.mark.parametrize("key", list(EXPERTS))
def test_full_size_diffusers_transformer_maps_onto_release_names(layout_fixture, key):
    release = layout_fixture[key]["tensors"]
    cfg = PRESETS[EXPERTS[key]].transformer
    assert keymaps.transformer_config_from_release(layout_fixture[key]["config"]) == cfg
    model = diffusers_transformer(cfg, device="meta")
    assert shapes(model, keymaps.transformer_to_release) == release
    assert {keymaps.transformer_to_diffusers(n) for n in release} == set(model.state_dict())


@pytest.mark.parametrize("key, cfg", [("vae2_1", VAE_2_1), ("vae2_2", VAE_2_2)])
def test_full_size_diffusers_vae_maps_onto_release_names(layout_fixture, key, cfg):
    release = layout_fixture[key]["tensors"]
    model = diffusers_vae(cfg, device="meta")
    assert shapes(model, keymaps.vae_renamer(cfg, to_diffusers=False)) == release
    to_diffusers = keymaps.vae_renamer(cfg, to_diffusers=True)
    assert {to_diffusers(n) for n in release} == set(model.state_dict())


@pytest.mark.parametrize("key", list(EXPERTS))
def test_transformer_names_round_trip(layout_fixture, key):
    for name in layout_fixture[key]["tensors"]:
        there = keymaps.transformer_to_diffusers(name)
        assert there != name or name.startswith("patch_embedding.")
        assert keymaps.transformer_to_release(there) == name


def test_transformer_map_matches_whole_components_only():
    assert keymaps.transformer_to_release("blocks.3.norm2.weight") == "blocks.3.norm3.weight"
    assert keymaps.transformer_to_diffusers("blocks.3.norm3.weight") == "blocks.3.norm2.weight"
    assert keymaps.transformer_to_diffusers("head.modulation") == "scale_shift_table"
    assert keymaps.transformer_to_release("blocks.0.scale_shift_table") == "blocks.0.modulation"
    assert keymaps.transformer_to_diffusers("blocks.1.cross_attn.k_img.weight") == (
        "blocks.1.attn2.add_k_proj.weight"
    )
    for unknown in ("head.modulation_extra", "blocks.x.self_attn.q.weight", "foo.bar"):
        assert keymaps.transformer_to_diffusers(unknown) == unknown


@pytest.mark.parametrize("cfg", [VAE_2_1, VAE_2_2, TINY_VAE, TINY_VAE_22])
def test_vae_names_round_trip(cfg):
    model = diffusers_vae(cfg, device="meta")
    to_release = keymaps.vae_renamer(cfg, to_diffusers=False)
    for name in model.state_dict():
        assert keymaps.vae_to_diffusers(to_release(name), cfg) == name


def test_comfyui_prefix_is_stripped():
    assert (
        keymaps.strip_comfyui_prefix("model.diffusion_model.head.head.weight") == "head.head.weight"
    )
    assert (
        keymaps.strip_comfyui_prefix("diffusion_model.blocks.0.modulation") == "blocks.0.modulation"
    )
    assert keymaps.strip_comfyui_prefix("head.head.weight") == "head.head.weight"


@pytest.mark.parametrize("preset", ["t2v-A14B", "i2v-A14B", "ti2v-5B", "tiny-t2v"])
def test_transformer_configs_round_trip(preset):
    cfg = PRESETS[preset].transformer
    model_type = "ti2v" if cfg.model_type == "ti2v" else None
    d = keymaps.transformer_config_to_diffusers(cfg)
    back = keymaps.transformer_config_from_diffusers(
        d, model_type=model_type, text_len=cfg.text_len
    )
    assert back == cfg
    assert (
        keymaps.transformer_config_from_release(keymaps.transformer_config_to_release(cfg)) == cfg
    )


def test_release_config_json_defaults_and_errors():
    # The shipped config.json omits keys that equal WanModel's defaults.
    shipped = {
        "_class_name": "WanModel",
        "_diffusers_version": "0.33.0",
        "dim": 5120,
        "eps": 1e-06,
        "ffn_dim": 13824,
        "freq_dim": 256,
        "in_dim": 16,
        "model_type": "t2v",
        "num_heads": 40,
        "num_layers": 40,
        "out_dim": 16,
        "text_len": 512,
    }
    assert keymaps.transformer_config_from_release(shipped) == PRESETS["t2v-A14B"].transformer
    with pytest.raises(ValueError, match="num_heads"):
        keymaps.transformer_config_from_release({"dim": 64})
    with pytest.raises(ValueError, match="image_dim"):
        d = keymaps.transformer_config_to_diffusers(TINY_TRANSFORMER) | {"image_dim": 1280}
        keymaps.transformer_config_from_diffusers(d)


@pytest.mark.parametrize("cfg", [VAE_2_1, VAE_2_2, TINY_VAE, TINY_VAE_22])
def test_vae_configs_round_trip(cfg):
    back = keymaps.vae_config_from_diffusers(keymaps.vae_config_to_diffusers(cfg))
    if not cfg.latents_mean:  # the diffusers config always holds the constants
        back = VAEConfig(**{**back.__dict__, "latents_mean": (), "latents_std": ()})
    assert back == cfg


def golden(name):
    path = GOLDEN_DIR / f"{name}.safetensors"
    if not path.exists():
        pytest.skip(f"golden file {path} not found")
    from safetensors import safe_open

    meta = safe_open(str(path), "pt").metadata()
    tensors = load_file(str(path))
    weights = {k[len("weight.") :]: v for k, v in tensors.items() if k.startswith("weight.")}
    return json.loads(meta["config"]), weights, tensors


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", ["dit_t2v", "dit_i2v", "dit_ti2v_per_token_t"])
def test_reference_weights_renamed_into_diffusers_reproduce_reference_output(name):
    raw, weights, tensors = golden(name)
    cfg = keymaps.transformer_config_from_release(raw)
    model = diffusers_transformer(cfg).eval()
    renamed = RenamedSource(DictSource(weights), keymaps.transformer_to_diffusers)
    report = load_into(model, renamed)  # strict: every name maps, every shape agrees
    assert report.loaded == len(weights)
    x = tensors["input.x.0"]
    if "input.y.0" in tensors:
        x = torch.cat([x, tensors["input.y.0"]])
    context = torch.zeros(1, cfg.text_len, cfg.text_dim)
    ctx = tensors["input.context.0"]
    context[0, : len(ctx)] = ctx
    with torch.no_grad():
        out = model(x[None], tensors["input.t"], context, return_dict=False)[0]
    assert rel_err(out[0], tensors["output.0"]) < 1e-4


@pytest.mark.parametrize("name", ["vae2_1", "vae2_2"])
def test_reference_vae_renamed_into_diffusers_reproduces_reference_output(name):
    raw, weights, tensors = golden(name)
    cfg = VAEConfig(generation=name[3] + "." + name[5], **raw)
    model = diffusers_vae(cfg).eval()
    load_into(
        model, RenamedSource(DictSource(weights), keymaps.vae_renamer(cfg, to_diffusers=True))
    )
    mean, std = (
        tensors["scale.mean"].view(1, -1, 1, 1, 1),
        tensors["scale.std"].view(1, -1, 1, 1, 1),
    )
    with torch.no_grad():
        mu = model.encode(tensors["input.video"]).latent_dist.mean
        video = model.decode(tensors["output.latent"] * std + mean).sample
    assert rel_err((mu - mean) / std, tensors["output.latent"]) < 1e-4
    assert rel_err(video, tensors["output.decoded"].clamp(-1, 1)) < 1e-4
