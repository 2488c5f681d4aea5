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

from collections.abc import Callable
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
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Under torchrun: sums a tensor over every rank that runs this expert's forwards (its
    sequence and CFG ranks), so that all measure one change and skip the same steps (ranks that
    skipped differently would wait on each other's all-to-all forever). None: one process."""
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

    def run(self, blocks, x: torch.Tensor, *args, tokens: int | None = None) -> torch.Tensor:
        """The block stack on x (B, L, D), skipping all but the first block when allowed.

        `tokens`: under sequence parallelism, how many of this rank's L tokens are real (the
        rest is padding, left out of the change); needs `reduce`."""
        if tokens is not None and self.reduce is None:
            raise ValueError(
                "a step cache on a sequence-parallel expert needs `reduce` (a sum over the ranks "
                "that run it) so that every rank skips the same steps: let Pipeline.set_parallel "
                "make the caches, or pass reduce="
            )
        first = blocks[0](x, *args)  # (B, L, D)
        residual = first - x  # (B, L, D)
        if self._first is not None and self._first.shape != residual.shape:
            self.reset()
        change = float("nan")
        if self._first is not None:
            change = self._change(residual, tokens)
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

    def _change(self, residual: torch.Tensor, tokens: int | None) -> float:
        """Relative L1 change of the first block's residual since the last full step."""
        if self.reduce is None:
            return ((residual - self._first).abs().mean() / self._first.abs().mean()).item()
        now, then = residual[:, :tokens], self._first[:, :tokens]  # (B, L_real, D)
        sums = torch.stack([(now - then).abs().sum(), then.abs().sum()]).double()  # (2,)
        moved, size = self.reduce(sums).tolist()  # over every rank: the whole sequence and batch
        return moved / size
