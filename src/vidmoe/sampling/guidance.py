"""Classifier-free guidance: combine conditional and unconditional velocities.

Cond and uncond run as one batch: `cfg_batch` stacks them (cond first), `split_cfg_batch` splits
the model output back, `apply_guidance` combines them with an expert's scale.
"""

from __future__ import annotations

import torch
from einops import rearrange


def uses_uncond(scale: float) -> bool:
    """Whether a guidance scale needs the unconditional pass (scale 1 is the conditional alone)."""
    return scale != 1.0


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale * (cond - uncond); scale 1 returns `cond` itself, bit for bit.

    Args:
        cond, uncond: velocities of the same shape, e.g. (B, C, F, H, W).
        scale: guidance scale >= 0.
    Returns:
        The guided velocity, same shape.
    """
    if scale < 0:
        raise ValueError(f"guidance scale must be >= 0; got {scale}")
    if cond.shape != uncond.shape:
        raise ValueError(
            f"cond and uncond must have the same shape; got {tuple(cond.shape)} and "
            f"{tuple(uncond.shape)}"
        )
    if not uses_uncond(scale):
        return cond
    # parity: the release's form and order of operations
    return uncond + scale * (cond - uncond)


def cfg_batch(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """Stack cond and uncond inputs into one batch, cond first: (B, ...) x2 -> (2B, ...)."""
    if cond.shape != uncond.shape:
        raise ValueError(
            f"cond and uncond must have the same shape; got {tuple(cond.shape)} and "
            f"{tuple(uncond.shape)}"
        )
    return torch.cat([cond, uncond], dim=0)  # (2B, ...)


def split_cfg_batch(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a (2B, ...) output of a `cfg_batch` input into (cond, uncond), each (B, ...)."""
    if out.shape[0] % 2:
        raise ValueError(f"a cond+uncond batch has an even batch size; got {out.shape[0]}")
    cond, uncond = rearrange(out, "(two b) ... -> two b ...", two=2)  # (2, B, ...)
    return cond, uncond
