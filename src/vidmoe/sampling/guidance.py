"""Classifier-free guidance: combine conditional and unconditional velocities.

Cond and uncond run as one batch: `cfg_batch` stacks them (cond first), `split_cfg_batch` splits
the model output back, `apply_guidance` combines them with an expert's scale; `guided_velocity`
does all three around one model call (the pipeline's only path).
"""

from __future__ import annotations

from collections.abc import Callable

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


def guided_velocity(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: list[torch.Tensor],
    uncond: list[torch.Tensor],
    scale: float,
    *,
    y: torch.Tensor | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """One expert's guided velocity: cond and uncond in one batch (scale 1: cond alone).

    Args:
        model: called as model(x (B', C, F, H, W), sigma (B', ...), context list, y=...).
        x: (B, C, F, H, W) latents; sigma: (B,) or (B, L) noise levels.
        cond, uncond: per-sample text embeddings, each a list of B (S_i, D) tensors.
        scale: guidance scale >= 0.
        y: (B, C_y, F, H, W) extra conditioning channels (i2v), or None.
        **model_kwargs: passed to the model (e.g. `cache=`).
    Returns:
        (B, C, F, H, W) guided velocity.
    """
    if not uses_uncond(scale):  # guidance 1 is the conditional prediction: skip the uncond pass
        return model(x, sigma, cond, y=y, **model_kwargs)
    both = model(
        cfg_batch(x, x),
        cfg_batch(sigma, sigma),
        cond + uncond,
        y=None if y is None else cfg_batch(y, y),
        **model_kwargs,
    )  # (2B, C, F, H, W)
    return apply_guidance(*split_cfg_batch(both), scale)
