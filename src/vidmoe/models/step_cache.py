"""A step cache for the block stack: skip most blocks at a step whose first block barely moved.

At every denoising step the expert runs its first block; if that block's residual changed little
since the last step that ran in full (relative L1 change below `threshold`), the other blocks
are skipped and their residual from that step is added again, in the manner of first-block
caching (FBCache, cache-dit's DBCache) and TeaCache/MagCache. Each expert gets its own cache
(thresholds differ by noise level), and a cache forgets everything when its expert switches or
the batch shape changes, so no residual is ever reused across experts.

Shape legend: B batch (cond + uncond), L video tokens, D width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepCache:
    """Residual cache of one expert's block stack across denoising steps."""

    threshold: float
    """Largest relative L1 change of the first block's residual that still reuses the cache
    (0 never skips)."""
    max_skips: int = 2
    """Most consecutive steps served from the cache before a full evaluation is forced."""
    warmup: int = 1
    """Steps that always run in full after a reset."""
    skipped: int = 0
    """Steps served from the cache since creation (for the trace and the benchmark)."""
    changes: list[float] = field(default_factory=list)
    """Relative change measured at each step (NaN where nothing could be compared)."""
    _first: torch.Tensor | None = None
    _rest: torch.Tensor | None = None
    _steps: int = 0
    _run: int = 0

    def __post_init__(self) -> None:
        if not self.threshold >= 0:
            raise ValueError(f"step cache threshold must be a number >= 0; got {self.threshold}")
        if self.max_skips < 0 or self.warmup < 1:
            raise ValueError(
                f"step cache needs max_skips >= 0 and warmup >= 1; got {self.max_skips}, {self.warmup}"
            )

    def reset(self) -> None:
        """Forget the cached residuals (an expert switch, a new video)."""
        self._first = self._rest = None
        self._steps = self._run = 0

    def run(self, blocks, x: torch.Tensor, *args) -> torch.Tensor:
        """The block stack on x (B, L, D), skipping all but the first block when allowed."""
        first = blocks[0](x, *args)  # (B, L, D)
        residual = first - x  # (B, L, D)
        if self._first is not None and self._first.shape != residual.shape:
            self.reset()
        change = float("nan")
        if self._first is not None:
            change = ((residual - self._first).abs().mean() / self._first.abs().mean()).item()
        self.changes.append(change)
        self._steps += 1
        reuse = (
            self._rest is not None
            and self._steps > self.warmup
            and self._run < self.max_skips
            and change < self.threshold
        )
        if reuse:
            self._run += 1
            self.skipped += 1
            return first + self._rest  # (B, L, D)
        out = first
        for block in blocks[1:]:
            out = block(out, *args)  # (B, L, D)
        self._first, self._rest, self._run = residual, out - first, 0
        return out
