"""CFG parallelism: the conditional and the unconditional pass of a guided step on different
ranks (as xDiT, LightX2V and FastVideo do), instead of one batch of two on every rank.

cfg rank 0 runs the conditional pass and cfg rank 1 the unconditional one; an all_gather gives
both velocities to both, and both apply the same guidance arithmetic, so every rank holds the
same guided velocity and takes the same solver step. A step with guidance 1 needs no
unconditional pass: both ranks run the conditional one and nothing is exchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from vidmoe.sampling.guidance import apply_guidance, uses_uncond


def split_guided_velocity(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: list[torch.Tensor],
    uncond: list[torch.Tensor],
    scale: float,
    *,
    cfg_rank: int,
    group: Any,
    y: torch.Tensor | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """`guided_velocity` with cond on cfg rank 0 and uncond on cfg rank 1 of `group`.

    Args:
        model, x, sigma, cond, uncond, scale, y, model_kwargs: as `guided_velocity`'s.
        cfg_rank: this rank's place in the CFG pair (0: cond, 1: uncond).
        group: the torch.distributed group of the pair.
    Returns:
        (B, C, F, H, W) guided velocity, the same on both ranks.
    """
    if not uses_uncond(scale):  # guidance 1: both ranks run the conditional pass
        return model(x, sigma, cond, y=y, **model_kwargs)
    mine = model(x, sigma, (cond, uncond)[cfg_rank], y=y, **model_kwargs)  # (B, C, F, H, W)
    both = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(both, mine.contiguous(), group=group)  # [cond, uncond]
    return apply_guidance(both[0], both[1], scale)
