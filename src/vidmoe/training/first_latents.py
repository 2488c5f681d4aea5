"""Issue 23's first-frame targets for a VAE stage: the latents from which a decoder draws first
frames right (`invert_first_latents`), and a bank of them an encoder stage is pulled to
(`FirstLatentBank`, read through `VAETrainConfig.first_latent_bank`). The demo encoder gives a
black and a dark-blue first frame nearly one latent; these targets separate them
(docs/first_frame.md). Shape letters: N frames, Z latent channels, H, W pixels, h, w latent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vidmoe.config import VAEConfig
from vidmoe.models.vae import WanVAE
from vidmoe.models.vae_blocks import CausalCache


def posterior_mean(vae: WanVAE, video: Tensor) -> Tensor:
    """The encoder's posterior mean of a clip from its start, in one pass and unnormalised (what
    training steers; gradients follow the caller's mode): (B, 3, T, H, W) -> (B, Z, F, h, w)."""
    cache = CausalCache()
    cache.claim("encode")
    mu, _log_var = vae.conv1(vae.encoder(video, cache)).chunk(2, dim=1)
    return mu


@dataclass(frozen=True)
class FirstLatentBank:
    """First frames and the latents a decoder draws them right from (`first_latent_bank`)."""

    frames: Tensor
    """(N, 3, 1, H, W) in [-1, 1]."""
    latents: Tensor
    """(N, Z, 1, h, w) at the posterior's scale."""

    @classmethod
    def load(
        cls, path: str | Path, vae_config: VAEConfig, size: tuple[int, int]
    ) -> FirstLatentBank:
        """Read and check a bank for a VAE of `vae_config` and frames of `size` (H, W)."""
        from vidmoe.io.tensors import open_tensors

        path = Path(path)
        if not path.is_file():
            raise ValueError(
                f"first_latent_bank {path} does not exist (write one with "
                "recipes/demo/first_latent_bank.py)"
            )
        try:
            tensors = open_tensors(path)
            frames, latents = tensors["frames"].float(), tensors["latents"].float()
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(
                f"first_latent_bank {path} is not a bank of first latents (safetensors with "
                f"'frames' and 'latents'): {e}"
            ) from None
        s, z = vae_config.spatial_stride, vae_config.z_dim
        h, w = size
        want_f, want_l = (3, 1, h, w), (z, 1, h // s, w // s)
        if (
            frames.ndim != 5
            or tuple(frames.shape[1:]) != want_f
            or latents.ndim != 5
            or tuple(latents.shape[1:]) != want_l
            or len(frames) != len(latents)
            or not len(frames)
        ):
            raise ValueError(
                f"first_latent_bank {path}: frames {tuple(frames.shape)} and latents "
                f"{tuple(latents.shape)} do not fit this run: want (N, {', '.join(map(str, want_f))}) "
                f"and (N, {', '.join(map(str, want_l))}), the same N >= 1"
            )
        return cls(frames, latents)

    def distance(self, vae: WanVAE, index: np.ndarray) -> Tensor:
        """Mean squared distance of `vae`'s latents of the frames at `index` to the bank's, each
        channel over the bank latents' variance: scalar."""
        frames, target = self.frames[index], self.latents[index]  # (b, 3, 1, H, W), (b, Z, 1, h, w)
        mu = posterior_mean(vae, frames)  # (b, Z, 1, h, w)
        return ((mu - target).pow(2) / self.variance).mean()

    @cached_property
    def variance(self) -> Tensor:
        """The bank latents' variance per channel: (1, Z, 1, 1, 1)."""
        return self.latents.var(dim=(0, 2, 3, 4), keepdim=True).clamp_min(1e-6)


def invert_first_latents(
    vae: WanVAE,
    frames: Tensor,
    *,
    steps: int = 60,
    lr: float = 0.05,
    batch_size: int = 32,
    log=None,
) -> Tensor:
    """For each first frame, the latent from which `vae`'s decoder draws it right: Adam on
    latent frame 0, from the encoder's, on the decoded frame's L1 error (the decoder frozen).

    Issue 23: the demo encoder gives a black and a dark-blue first frame nearly one latent, and
    the decoder, which can draw each right from another latent, draws both as their average.
    Args:
        frames: (N, 3, 1, H, W) in [-1, 1].
    Returns:
        (N, Z, 1, h, w) latents at the posterior's scale (what `vae.conv1` gives, unnormalised).
    """
    vae = vae.eval()
    found = []
    for start in range(0, len(frames), batch_size):
        x = frames[start : start + batch_size]  # (b, 3, 1, H, W)
        with torch.no_grad():
            z = posterior_mean(vae, x).requires_grad_(True)  # (b, Z, 1, h, w)
        opt = torch.optim.Adam([z], lr=lr)
        for _ in range(steps):
            cache = CausalCache()
            cache.claim("decode")
            error = (vae.decoder(vae.conv2(z), cache) - x).abs().mean()
            opt.zero_grad(set_to_none=True)
            error.backward()
            opt.step()
        found.append(z.detach())
        if log is not None:
            log(
                json.dumps(
                    {"inverted": start + len(x), "of": len(frames), "l1": round(error.item(), 5)}
                )
            )
    return torch.cat(found)
