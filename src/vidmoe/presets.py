"""The named model presets: the released Wan2.2 configurations (t2v-A14B, i2v-A14B, ti2v-5B)
with the release's latent normalisation constants, and tiny ones for tests."""

from __future__ import annotations

import dataclasses

from vidmoe.config import ModelConfig, MoEConfig, SchedulerConfig, TransformerConfig, VAEConfig

# parity: the release's latent normalisation constants (Wan2.1 VAE, 16 channels).
WAN21_LATENTS_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)
# parity: the release's latent normalisation constants (Wan2.2 VAE, 48 channels).
WAN22_LATENTS_MEAN = (
    -0.2289,
    -0.0052,
    -0.1323,
    -0.2339,
    -0.2799,
    0.0174,
    0.1838,
    0.1557,
    -0.1382,
    0.0542,
    0.2813,
    0.0891,
    0.1570,
    -0.0098,
    0.0375,
    -0.1825,
    -0.2246,
    -0.1207,
    -0.0698,
    0.5109,
    0.2665,
    -0.2108,
    -0.2158,
    0.2502,
    -0.2055,
    -0.0322,
    0.1109,
    0.1567,
    -0.0729,
    0.0899,
    -0.2799,
    -0.1230,
    -0.0313,
    -0.1649,
    0.0117,
    0.0723,
    -0.2839,
    -0.2083,
    -0.0520,
    0.3748,
    0.0152,
    0.1957,
    0.1433,
    -0.2944,
    0.3573,
    -0.0548,
    -0.1681,
    -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765,
    1.0364,
    0.4514,
    1.1677,
    0.5313,
    0.4990,
    0.4818,
    0.5013,
    0.8158,
    1.0344,
    0.5894,
    1.0901,
    0.6885,
    0.6165,
    0.8454,
    0.4978,
    0.5759,
    0.3523,
    0.7135,
    0.6804,
    0.5833,
    1.4146,
    0.8986,
    0.5659,
    0.7069,
    0.5338,
    0.4889,
    0.4917,
    0.4069,
    0.4999,
    0.6866,
    0.4093,
    0.5709,
    0.6065,
    0.6415,
    0.4944,
    0.5726,
    1.2042,
    0.5458,
    1.6887,
    0.3971,
    1.0600,
    0.3943,
    0.5537,
    0.5444,
    0.4089,
    0.7468,
    0.7744,
)

VAE_2_1 = VAEConfig(
    generation="2.1",
    dim=96,
    z_dim=16,
    num_res_blocks=2,
    latents_mean=WAN21_LATENTS_MEAN,
    latents_std=WAN21_LATENTS_STD,
)
VAE_2_2 = VAEConfig(
    generation="2.2",
    dim=160,
    dec_dim=256,
    z_dim=48,
    num_res_blocks=2,
    latents_mean=WAN22_LATENTS_MEAN,
    latents_std=WAN22_LATENTS_STD,
)

_A14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
_SIZES_A14B = ((1280, 720), (720, 1280), (832, 480), (480, 832))

PRESETS: dict[str, ModelConfig] = {
    "t2v-A14B": ModelConfig(
        name="t2v-A14B",
        transformer=TransformerConfig(model_type="t2v", in_dim=16, out_dim=16, **_A14B),
        vae=VAE_2_1,
        moe=MoEConfig(boundaries=(0.875,), guidance=(4.0, 3.0)),
        scheduler=SchedulerConfig(sampler="unipc", num_steps=40, shift=12.0),
        sizes=_SIZES_A14B,
    ),
    "i2v-A14B": ModelConfig(
        name="i2v-A14B",
        transformer=TransformerConfig(model_type="i2v", in_dim=36, out_dim=16, **_A14B),
        vae=VAE_2_1,
        moe=MoEConfig(boundaries=(0.900,), guidance=(3.5, 3.5)),
        scheduler=SchedulerConfig(sampler="unipc", num_steps=40, shift=5.0),
        sizes=_SIZES_A14B,
    ),
    "ti2v-5B": ModelConfig(
        name="ti2v-5B",
        transformer=TransformerConfig(
            model_type="ti2v",
            in_dim=48,
            out_dim=48,
            dim=3072,
            ffn_dim=14336,
            num_heads=24,
            num_layers=30,
        ),
        vae=VAE_2_2,
        # The 5B model is dense: one expert that owns every sigma.
        moe=MoEConfig(expert_names=("dense",), boundaries=(), guidance=(5.0,)),
        scheduler=SchedulerConfig(sampler="unipc", num_steps=50, shift=5.0),
        sizes=((1280, 704), (704, 1280)),
        default_size=(1280, 704),
        default_num_frames=121,
        fps=24,
    ),
}

TINY_TRANSFORMER = TransformerConfig(
    model_type="t2v",
    text_len=32,
    in_dim=16,
    dim=96,
    ffn_dim=192,
    freq_dim=256,
    text_dim=48,
    out_dim=16,
    num_heads=4,
    num_layers=2,
)
TINY_VAE = VAEConfig(generation="2.1", dim=16, z_dim=16, num_res_blocks=1)


def _tiny(name: str, model_type: str, *, moe: MoEConfig, shift: float, **changes) -> ModelConfig:
    """A tiny preset for tests: TINY_TRANSFORMER as `model_type` (with `changes` to it, and
    `vae` among them: default TINY_VAE), 4 UniPC steps at `shift`, 9 frames of 64x64."""
    vae = changes.pop("vae", TINY_VAE)
    return ModelConfig(
        name=name,
        transformer=dataclasses.replace(TINY_TRANSFORMER, model_type=model_type, **changes),
        vae=vae,
        moe=moe,
        scheduler=SchedulerConfig(sampler="unipc", num_steps=4, shift=shift),
        text_encoder="umt5-tiny",
        default_size=(64, 64),
        default_num_frames=9,
    )


PRESETS["tiny-t2v"] = _tiny(
    "tiny-t2v", "t2v", moe=MoEConfig(boundaries=(0.875,), guidance=(4.0, 3.0)), shift=12.0
)
PRESETS["tiny-i2v"] = _tiny(
    "tiny-i2v", "i2v", moe=MoEConfig(boundaries=(0.9,), guidance=(3.5, 3.5)), shift=5.0, in_dim=36
)
PRESETS["tiny-ti2v"] = _tiny(
    "tiny-ti2v",
    "ti2v",
    moe=MoEConfig(expert_names=("dense",), boundaries=(), guidance=(5.0,)),
    shift=5.0,
    in_dim=48,
    out_dim=48,
    vae=VAEConfig(generation="2.2", dim=16, dec_dim=16, z_dim=48, num_res_blocks=1),
)


def get_preset(name: str) -> ModelConfig:
    """Look up a named preset; the error lists the known names."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]
