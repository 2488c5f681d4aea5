"""Parameter-name maps between the release (Wan2.2 `.pth`/safetensors) names and other layouts.

Our modules use the release names, so every map here turns a foreign name into a release name
(or back, for writers). Maps are pure functions of a name (and, for the VAE, its config); a name a
map does not know passes through unchanged, so a strict load reports it as unexpected.
No tensor needs a reshape: every diffusers tensor has the release tensor's shape.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from vidmoe.config import TransformerConfig, VAEConfig

# Prefixes a ComfyUI single file puts before the release names.
COMFYUI_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# (release prefix, diffusers prefix); `{i}` is a block index. Matched on whole dotted components.
_TRANSFORMER_PAIRS: tuple[tuple[str, str], ...] = (
    ("patch_embedding.", "patch_embedding."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    # Wan2.1 i2v/flf2v CLIP image embedding (absent from the Wan2.2 experts).
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("blocks.{i}.self_attn.q.", "blocks.{i}.attn1.to_q."),
    ("blocks.{i}.self_attn.k.", "blocks.{i}.attn1.to_k."),
    ("blocks.{i}.self_attn.v.", "blocks.{i}.attn1.to_v."),
    ("blocks.{i}.self_attn.o.", "blocks.{i}.attn1.to_out.0."),
    ("blocks.{i}.self_attn.norm_q.", "blocks.{i}.attn1.norm_q."),
    ("blocks.{i}.self_attn.norm_k.", "blocks.{i}.attn1.norm_k."),
    ("blocks.{i}.cross_attn.q.", "blocks.{i}.attn2.to_q."),
    ("blocks.{i}.cross_attn.k.", "blocks.{i}.attn2.to_k."),
    ("blocks.{i}.cross_attn.v.", "blocks.{i}.attn2.to_v."),
    ("blocks.{i}.cross_attn.o.", "blocks.{i}.attn2.to_out.0."),
    ("blocks.{i}.cross_attn.norm_q.", "blocks.{i}.attn2.norm_q."),
    ("blocks.{i}.cross_attn.norm_k.", "blocks.{i}.attn2.norm_k."),
    ("blocks.{i}.cross_attn.k_img.", "blocks.{i}.attn2.add_k_proj."),
    ("blocks.{i}.cross_attn.v_img.", "blocks.{i}.attn2.add_v_proj."),
    ("blocks.{i}.cross_attn.norm_k_img.", "blocks.{i}.attn2.norm_added_k."),
    # parity: the release's `norm3` is the cross-attention norm; diffusers calls it `norm2`.
    ("blocks.{i}.norm3.", "blocks.{i}.norm2."),
    ("blocks.{i}.ffn.0.", "blocks.{i}.ffn.net.0.proj."),
    ("blocks.{i}.ffn.2.", "blocks.{i}.ffn.net.2."),
    ("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),  # [1, 6, D] both
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),  # [1, 2, D] both
)


def _compile(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_TO_DIFFUSERS = [(_compile(r), d) for r, d in _TRANSFORMER_PAIRS]
_TO_RELEASE = [(_compile(d), r) for r, d in _TRANSFORMER_PAIRS]


def _rename(name: str, table: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, template in table:
        m = pattern.match(name)
        if m and (m.end() == len(name) or name[m.end() - 1] == "."):
            return template.replace("{i}", m.groupdict().get("i") or "") + name[m.end() :]
    return name


def transformer_to_release(name: str) -> str:
    """A diffusers `WanTransformer3DModel` parameter name -> the release `WanModel` name."""
    return _rename(name, _TO_RELEASE)


def transformer_to_diffusers(name: str) -> str:
    """A release `WanModel` parameter name -> the diffusers `WanTransformer3DModel` name."""
    return _rename(name, _TO_DIFFUSERS)


def strip_comfyui_prefix(name: str) -> str:
    """Drop a ComfyUI `model.diffusion_model.` / `diffusion_model.` prefix, if any."""
    for prefix in COMFYUI_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


# Inside a VAE residual block: release `residual.{0,2,3,6}` / `shortcut` -> diffusers leaf names.
_RESBLOCK_LEAVES = (
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)


def vae_block_pairs(cfg: VAEConfig) -> list[tuple[str, str, bool]]:
    """(release prefix, diffusers prefix, is_resblock) for every VAE module of this config.

    The Wan2.1 VAE keeps flat `downsamples`/`upsamples` lists; the Wan2.2 VAE nests them per
    level. diffusers groups the decoder per level for both, and the encoder per level for 2.2.
    """
    if cfg.attn_scales:
        raise ValueError(
            f"VAE attn_scales={list(cfg.attn_scales)} has no diffusers layout; only the released "
            "configuration (attn_scales=()) can be mapped"
        )
    num_levels, num_res = len(cfg.dim_mult), cfg.num_res_blocks
    pairs: list[tuple[str, str, bool]] = [
        ("conv1.", "quant_conv.", False),
        ("conv2.", "post_quant_conv.", False),
    ]
    for part in ("encoder", "decoder"):
        pairs += [
            (f"{part}.conv1.", f"{part}.conv_in.", False),
            (f"{part}.middle.0.", f"{part}.mid_block.resnets.0.", True),
            (f"{part}.middle.1.", f"{part}.mid_block.attentions.0.", False),
            (f"{part}.middle.2.", f"{part}.mid_block.resnets.1.", True),
            (f"{part}.head.0.", f"{part}.norm_out.", False),
            (f"{part}.head.2.", f"{part}.conv_out.", False),
        ]
    flat = 0
    for level in range(num_levels):
        has_resample = level != num_levels - 1
        for j in range(num_res + int(has_resample)):
            is_res = j < num_res
            if cfg.generation == "2.2":
                rel = f"encoder.downsamples.{level}.downsamples.{j}."
                dif = f"encoder.down_blocks.{level}." + (
                    f"resnets.{j}." if is_res else "downsampler."
                )
            else:
                rel, dif = f"encoder.downsamples.{flat}.", f"encoder.down_blocks.{flat}."
            pairs.append((rel, dif, is_res))
            flat += 1
    flat = 0
    for level in range(num_levels):
        has_resample = level != num_levels - 1
        for j in range(num_res + 1 + int(has_resample)):
            is_res = j <= num_res
            if cfg.generation == "2.2":
                rel = f"decoder.upsamples.{level}.upsamples.{j}."
                tail = f"resnets.{j}." if is_res else "upsampler."
            else:
                rel = f"decoder.upsamples.{flat}."
                tail = f"resnets.{j}." if is_res else "upsamplers.0."
            pairs.append((rel, f"decoder.up_blocks.{level}." + tail, is_res))
            flat += 1
    return pairs


def vae_renamer(cfg: VAEConfig, *, to_diffusers: bool) -> Callable[[str], str]:
    """A one-argument VAE name map for `cfg` (the block table is built once)."""
    table = vae_block_pairs(cfg)
    pairs = [(r, d, res) if to_diffusers else (d, r, res) for r, d, res in table]

    def rename(name: str) -> str:
        for src, dst, is_res in pairs:
            if name.startswith(src):
                leaf = name[len(src) :]
                if is_res:
                    for rel_leaf, dif_leaf in _RESBLOCK_LEAVES:
                        a, b = (rel_leaf, dif_leaf) if to_diffusers else (dif_leaf, rel_leaf)
                        if leaf.startswith(a):
                            leaf = b + leaf[len(a) :]
                            break
                return dst + leaf
        return name

    return rename


def vae_to_release(name: str, cfg: VAEConfig) -> str:
    """A diffusers `AutoencoderKLWan` parameter name -> the release VAE (`WanVAE_`) name."""
    return vae_renamer(cfg, to_diffusers=False)(name)


def vae_to_diffusers(name: str, cfg: VAEConfig) -> str:
    """A release VAE (`WanVAE_`) parameter name -> the diffusers `AutoencoderKLWan` name."""
    return vae_renamer(cfg, to_diffusers=True)(name)


# --- configs ------------------------------------------------------------------------------------

# Keys the release `WanModel` config.json must hold; the rest default to `WanModel`'s defaults,
# which `TransformerConfig`'s defaults equal (patch_size, text_len, freq_dim, text_dim, ...).
_RELEASE_REQUIRED = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim")
_DIFFUSERS_REQUIRED = (
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "ffn_dim",
    "num_layers",
)


def _require(d: Mapping[str, Any], keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"{what} lacks {missing}; it has {sorted(d)}")


def transformer_config_from_release(d: Mapping[str, Any]) -> TransformerConfig:
    """The release `config.json` (`_class_name: WanModel`, keys dim, num_heads, ...) -> config."""
    _require(d, _RELEASE_REQUIRED, "release transformer config")
    return TransformerConfig.from_dict(dict(d))


def transformer_config_to_release(cfg: TransformerConfig) -> dict[str, Any]:
    """`TransformerConfig` -> the release `config.json` dict."""
    return {"_class_name": "WanModel", **cfg.to_dict()}


def transformer_config_from_diffusers(
    d: Mapping[str, Any], *, model_type: str | None = None, text_len: int = 512
) -> TransformerConfig:
    """A diffusers `WanTransformer3DModel` config.json -> `TransformerConfig`.

    diffusers does not store the model type: `in_channels != out_channels` means 'i2v', else
    't2v'; pass `model_type='ti2v'` when the pipeline's `expand_timesteps` is true. `text_len`
    is the pipeline's `max_sequence_length` (512 in every release).
    """
    _require(d, _DIFFUSERS_REQUIRED, "diffusers transformer config")
    for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if d.get(key) is not None:
            raise ValueError(
                f"diffusers transformer config has {key}={d[key]}: CLIP image conditioning "
                "(Wan2.1 i2v/flf2v) is not supported; Wan2.2 experts have none"
            )
    qk_norm = d.get("qk_norm", "rms_norm_across_heads")
    if qk_norm not in ("rms_norm_across_heads", None):
        raise ValueError(f"qk_norm must be 'rms_norm_across_heads' or null; got {qk_norm!r}")
    inferred = "i2v" if d["in_channels"] != d["out_channels"] else "t2v"
    return TransformerConfig(
        model_type=model_type or inferred,
        patch_size=tuple(d.get("patch_size", (1, 2, 2))),
        text_len=text_len,
        in_dim=d["in_channels"],
        dim=d["num_attention_heads"] * d["attention_head_dim"],
        ffn_dim=d["ffn_dim"],
        freq_dim=d.get("freq_dim", 256),
        text_dim=d.get("text_dim", 4096),
        out_dim=d["out_channels"],
        num_heads=d["num_attention_heads"],
        num_layers=d["num_layers"],
        qk_norm=qk_norm is not None,
        cross_attn_norm=d.get("cross_attn_norm", True),
        eps=d.get("eps", 1e-6),
    )


def transformer_config_to_diffusers(cfg: TransformerConfig) -> dict[str, Any]:
    """`TransformerConfig` -> a diffusers `WanTransformer3DModel` config.json dict."""
    if cfg.window_size != (-1, -1):
        raise ValueError(f"diffusers has no windowed attention; window_size={cfg.window_size}")
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_dim,
        "out_channels": cfg.out_dim,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None,
        "eps": cfg.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


def vae_config_from_diffusers(d: Mapping[str, Any]) -> VAEConfig:
    """A diffusers `AutoencoderKLWan` config.json -> `VAEConfig` (2.2 iff `is_residual`)."""
    generation = "2.2" if d.get("is_residual", False) else "2.1"
    patch, in_ch = d.get("patch_size"), d.get("in_channels", 3)
    if (generation == "2.2") != (patch == 2 and in_ch == 12):
        raise ValueError(
            f"diffusers VAE config is_residual={d.get('is_residual')} with patch_size={patch}, "
            f"in_channels={in_ch}: the Wan2.1 VAE has (False, None, 3), the Wan2.2 VAE (True, 2, 12)"
        )
    return VAEConfig(
        generation=generation,
        dim=d.get("base_dim", 96),
        dec_dim=d.get("decoder_base_dim") if generation == "2.2" else None,
        z_dim=d.get("z_dim", 16),
        dim_mult=tuple(d.get("dim_mult", (1, 2, 4, 4))),
        num_res_blocks=d.get("num_res_blocks", 2),
        attn_scales=tuple(d.get("attn_scales", ())),
        temperal_downsample=tuple(d.get("temperal_downsample", (False, True, True))),
        latents_mean=tuple(d.get("latents_mean", ())),
        latents_std=tuple(d.get("latents_std", ())),
    )


def vae_config_to_diffusers(cfg: VAEConfig) -> dict[str, Any]:
    """`VAEConfig` -> a diffusers `AutoencoderKLWan` config.json dict."""
    is_22 = cfg.generation == "2.2"
    return {
        "_class_name": "AutoencoderKLWan",
        "base_dim": cfg.dim,
        "decoder_base_dim": cfg.dec_dim if is_22 else None,
        "z_dim": cfg.z_dim,
        "dim_mult": list(cfg.dim_mult),
        "num_res_blocks": cfg.num_res_blocks,
        "attn_scales": list(cfg.attn_scales),
        "temperal_downsample": list(cfg.temperal_downsample),
        "dropout": 0.0,
        "latents_mean": list(cfg.latents_mean) or [0.0] * cfg.z_dim,
        "latents_std": list(cfg.latents_std) or [1.0] * cfg.z_dim,
        "is_residual": is_22,
        "in_channels": 12 if is_22 else 3,
        "out_channels": 12 if is_22 else 3,
        "patch_size": 2 if is_22 else None,
        "scale_factor_temporal": cfg.temporal_stride,
        "scale_factor_spatial": cfg.spatial_stride,
    }
