"""Tiny seeded pieces shared by the training tests: a fake VAE, a fake text encoder, a cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidmoe.config import MoEConfig, TransformerConfig

TINY_EXPERT = TransformerConfig(
    model_type="t2v",
    patch_size=(1, 2, 2),
    text_len=8,
    in_dim=4,
    dim=32,
    ffn_dim=64,
    freq_dim=32,
    text_dim=16,
    out_dim=4,
    num_heads=2,
    num_layers=1,
)
TINY_MOE = MoEConfig(boundaries=(0.875,), guidance=(4.0, 3.0))


def tiny_run(cache_dir, out_dir, **overrides) -> dict:
    """A TrainConfig dict of a few-step run of TINY_EXPERT experts (`overrides` replace keys)."""
    d = dict(
        cache=str(cache_dir),
        out_dir=str(out_dir),
        transformer=TINY_EXPERT.to_dict(),
        moe={"boundaries": [0.875], "guidance": [4.0, 3.0]},
        batch_size=4,
        lr=1e-3,
        warmup_steps=2,
        max_steps=8,
        log_every=2,
        checkpoint_every=3,
        ema_decay=0.9,
        sigma_shift=3.0,
        num_threads=1,
        use_progress=False,
    )
    d.update(overrides)
    return d


class PoolVAE(nn.Module):
    """Stand-in VAE: a fixed 1x1x1 projection of 4x4x4-pooled pixels to 4 channels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # before the conv: its bias is drawn too, so caches are reproducible
        self.proj = nn.Conv3d(3, 4, 1)
        nn.init.normal_(self.proj.weight)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:  # (B, 3, T, H, W) -> (B, 4, ...)
        return self.proj(F.avg_pool3d(video[:, :, 1:], 4))


class HashTextEncoder:
    """Stand-in text encoder: one 16-wide vector per word, seeded by the word."""

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        out = []
        for p in prompts:
            words = p.split()[:8] or ["<empty>"]
            vecs = [
                torch.randn(16, generator=torch.Generator().manual_seed(sum(map(ord, w))))
                for w in words
            ]
            out.append(torch.stack(vecs))
        return out


def fake_clips(n: int, num_frames: int = 9, size: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [
        {
            "video": torch.rand(3, num_frames, size, size, generator=g) * 2 - 1,
            "caption": f"clip {i} moving {'left' if i % 2 else 'right'}",
        }
        for i in range(n)
    ]


def write_tiny_cache(folder):
    """A latent cache of 12 fake clips (PoolVAE latents, HashTextEncoder text) in `folder`."""
    from vidmoe.training.data import build_latent_cache

    build_latent_cache(fake_clips(12), PoolVAE(), HashTextEncoder(), folder, text_len=8)
    return folder


def write_init_model(root):
    """A vidmoe model folder in `root` with two random TINY_EXPERT experts (non-zero heads,
    seed 7), a random VAE of the tiny preset and its vidmoe.json: an `init` for fine-tuning."""
    import dataclasses

    from vidmoe.io.atomic import save_safetensors_atomic, write_text_atomic
    from vidmoe.models.transformer import WanTransformer
    from vidmoe.models.vae import WanVAE
    from vidmoe.presets import PRESETS
    from vidmoe.training.checkpoint import export_experts

    config = dataclasses.replace(
        PRESETS["tiny-t2v"], name="tiny-ft", transformer=TINY_EXPERT, moe=TINY_MOE
    )
    torch.manual_seed(7)
    states = {}
    for name in TINY_MOE.expert_names:
        expert = WanTransformer(TINY_EXPERT)
        torch.nn.init.normal_(expert.head.head.weight, std=0.1)  # the release init zeroes it
        states[name] = expert.state_dict()
    export_experts(states, root, dtype=torch.float32)
    save_safetensors_atomic(WanVAE(config.vae).state_dict(), root / "vae.safetensors")
    write_text_atomic(config.to_json(), root / "vidmoe.json")
    return root
