"""Ulysses sequence parallelism, as the Wan2.2 release runs it (`--ulysses_size`).

After the patch embedding each of the P ranks of a group keeps L/P of the video tokens (the
sequence zero-padded to a multiple of P; the padding never reaches attention and is dropped at
the end). Everything per token (norms, modulation, FFN, cross-attention, the head) runs on the
rank's own tokens with no communication; self-attention trades tokens for heads with one
all-to-all, (B, L/P, N, Dh) -> (B, L, N/P, Dh), attends over the whole sequence for N/P heads
(windows included) and trades back with another. The head's output is all-gathered.

`TokenShard` is one forward's view of that split; the transformer holds a `SequenceParallel`
(`WanTransformer.set_sequence_parallel`). Only torch here: models import this module.

Shape legend: B batch, L video tokens (Lp padded to a multiple of P), N heads, Dh head width,
P ranks in the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def check_heads(num_heads: int, ranks: int) -> None:
    """ValueError unless `ranks` Ulysses ranks can split `num_heads` attention heads evenly."""
    if ranks < 1 or num_heads % ranks:
        ok = ", ".join(str(p) for p in range(1, num_heads + 1) if num_heads % p == 0)
        raise ValueError(
            f"Ulysses sequence parallelism splits the attention heads over the ranks, but the "
            f"expert has {num_heads} heads, not divisible by {ranks}: use --ulysses {ok}"
        )


def check_model_heads(config, ranks: int) -> None:
    """`check_heads` for every expert of a `ModelConfig` (before anything loads)."""
    for name in config.moe.expert_names:
        check_heads(config.transformer_for(name).num_heads, ranks)


@dataclass(frozen=True, kw_only=True)
class SequenceParallel:
    """The ranks that share one sequence: `group`, this rank's index in it and its size."""

    group: Any
    """A torch.distributed process group (not None: None would mean the whole world)."""
    rank: int
    size: int

    @classmethod
    def of(cls, group) -> SequenceParallel:
        """The split over `group`, this process's rank in it read from torch.distributed."""
        return cls(group=group, rank=dist.get_rank(group), size=dist.get_world_size(group))

    def shard(self, num_tokens: int) -> TokenShard:
        """The split of an `num_tokens`-token sequence over this group."""
        return TokenShard(group=self.group, rank=self.rank, size=self.size, num_tokens=num_tokens)


@dataclass(frozen=True, kw_only=True)
class TokenShard:
    """One sequence of `num_tokens` tokens split over `size` ranks; this rank holds the `rank`-th
    run of `local` tokens of the zero-padded sequence."""

    group: Any
    rank: int
    size: int
    num_tokens: int

    @property
    def local(self) -> int:
        """Tokens per rank, Lp / P."""
        return -(-self.num_tokens // self.size)

    @property
    def padded(self) -> int:
        """Lp: the sequence length padded to a multiple of P."""
        return self.local * self.size

    @property
    def num_real(self) -> int:
        """How many of this rank's tokens are real (not padding); the padding comes last."""
        return max(0, min(self.local, self.num_tokens - self.rank * self.local))

    def split(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a whole-sequence tensor: L -> L/P along `dim`, zero padding
        where the sequence runs out."""
        start = self.rank * self.local
        mine = t.narrow(dim, start, max(0, min(self.local, t.shape[dim] - start)))
        if mine.shape[dim] == self.local:
            return mine
        shape = list(t.shape)
        shape[dim] = self.local - mine.shape[dim]
        return torch.cat([mine, t.new_zeros(shape)], dim=dim)

    def gather(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's tokens in order, the padding dropped: (.., L/P, ..) -> (.., L, ..)."""
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, self.num_tokens)

    def heads_to_sequence(self, *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All heads of this rank's tokens -> N/P heads of every real token, in one all-to-all.

        Args:
            ts: tensors of one shape (B, L/P, N, Dh) and dtype (q, k, v).
        Returns:
            the same number of (B, L, N/P, Dh) tensors; padding tokens dropped.
        """
        stacked = torch.stack(ts)  # (T, B, L/P, N, Dh)
        full = self._all_to_all(stacked, scatter_dim=3, gather_dim=2)  # (T, B, Lp, N/P, Dh)
        return tuple(full[:, :, : self.num_tokens].unbind(0))  # T x (B, L, N/P, Dh)

    def sequence_to_heads(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of `heads_to_sequence`: (B, L, N/P, Dh) -> (B, L/P, N, Dh)."""
        pad = self.padded - t.shape[1]
        if pad:
            t = torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], dim=1)  # (B, Lp, ..)
        return self._all_to_all(t, scatter_dim=1, gather_dim=2)  # (B, L/P, N, Dh)

    def _all_to_all(self, t: torch.Tensor, *, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        """Chunk i of `scatter_dim` goes to rank i; what rank j sends lands j-th on `gather_dim`."""
        sends = [c.contiguous() for c in t.chunk(self.size, dim=scatter_dim)]
        recvs = [torch.empty_like(c) for c in sends]
        dist.all_to_all(recvs, sends, group=self.group)
        return torch.cat(recvs, dim=gather_dim)
