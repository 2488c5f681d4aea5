"""Data-parallel training of the experts over the processes of a torchrun world.

`DataParallel` is how one run spreads over its ranks: each rank takes an equal, contiguous
share of every global batch (`share`), runs the trained experts wrapped for its strategy
(`wrap`: torch DDP, or FSDP2 `fully_shard` per block with `parallel.fsdp.shard_blocks`), and turns sharded
state into whole tensors and back (`full_state`, `like_param`), so a checkpoint holds exactly
what a one-process run's holds and loads on any world size. Rank 0 writes files. A one-process
`DataParallel` does nothing: its methods hand back what they are given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vidmoe.parallel.fsdp import bf16_policy, shard_blocks
from vidmoe.parallel.world import World

__all__ = ["DataParallel", "RankMemory", "batch_share", "rank_memory"]


@dataclass(frozen=True, kw_only=True)
class RankMemory:
    """Bytes one rank holds for the trained weights of a run, activations aside."""

    params: int
    """The weights (fp32 master copies; frozen LoRA bases included)."""
    grads: int
    """Gradients of the trainable weights (fp32)."""
    optimizer: int
    """AdamW's two moments (fp32)."""
    ema: int
    """The EMA copies of the trainable weights (fp32)."""
    gathered: int
    """FSDP2: the whole weights of two blocks in the compute dtype (the running one and the
    next, prefetched) and one block's fp32 gradients (of its trainable share) before they are
    reduce-scattered."""

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.ema + self.gathered


def rank_memory(
    *,
    num_params: int,
    num_trainable: int,
    block_params: int,
    strategy: str,
    world_size: int,
    use_bf16: bool = False,
    use_ema: bool = True,
) -> RankMemory:
    """What `RankMemory` one rank of a run needs (per trained expert: sum over them).

    Args:
        num_params: the expert's parameters; num_trainable: those that train (all, or LoRA's).
        block_params: the parameters of its largest block (FSDP2 gathers one at a time).
        strategy: 'ddp' (every rank holds everything) or 'fsdp' (all of it sharded over
            `world_size` ranks, plus the gathered blocks).
    """
    n = world_size if strategy == "fsdp" else 1

    def per_rank(count: int, bytes_each: int) -> int:
        return math.ceil(count / n) * bytes_each

    gathered = 0
    if strategy == "fsdp" and world_size > 1:
        trainable = min(num_trainable / max(num_params, 1), 1.0)  # LoRA: the adapters' grads
        gathered = (
            block_params * 2 * (2 if use_bf16 else 4) + math.ceil(block_params * trainable) * 4
        )
    return RankMemory(
        params=per_rank(num_params, 4),
        grads=per_rank(num_trainable, 4),
        optimizer=per_rank(num_trainable, 8),
        ema=per_rank(num_trainable, 4) if use_ema else 0,
        gathered=gathered,
    )


def batch_share(batch_size: int, world: World) -> slice:
    """The samples of a global batch of `batch_size` that rank `world.rank` trains: an equal,
    contiguous run of them; a batch that does not split evenly is a ValueError."""
    per_rank, rest = divmod(batch_size, world.size)
    if rest or not per_rank:
        raise ValueError(
            f"batch_size {batch_size} (the global batch) must be a positive multiple of the "
            f"world size {world.size}, each rank taking an equal share: use "
            f"{max(per_rank, 1) * world.size} or {(per_rank + 1) * world.size}"
        )
    return slice(world.rank * per_rank, (world.rank + 1) * per_rank)


class DataParallel:
    """The trained experts of one run over the ranks of `world` (see the module docstring).

    Args:
        world: this process's place; a single process makes every method an identity.
        strategy: 'ddp' or 'fsdp' (`DistributedConfig.strategy`).
        device: this rank's device.
        use_bf16: FSDP2 computes in bf16 and reduces in fp32 (DDP runs under the loop's
            autocast instead).
        reshard_after_forward: FSDP2 frees each block's gathered weights after its forward.
    """

    def __init__(
        self,
        world: World,
        strategy: str = "ddp",
        *,
        device: torch.device,
        use_bf16: bool = False,
        reshard_after_forward: bool = True,
    ):
        if strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy must be 'ddp' or 'fsdp'; got {strategy!r}")
        if world.distributed and not dist.is_initialized():
            raise ValueError(
                f"rank {world.rank} of {world.size}: the process group is not joined; call "
                "vidmoe.parallel.world.start(world, device) first (the CLI does under torchrun)"
            )
        self.world, self.device = world, device
        self.strategy = strategy if world.distributed else "single"
        self.use_bf16, self.reshard_after_forward = use_bf16, reshard_after_forward
        self._mesh = None

    @property
    def size(self) -> int:
        return self.world.size

    @property
    def is_main(self) -> bool:
        return self.world.is_main

    def share(self, batch_size: int) -> slice:
        """This rank's samples of a global batch of `batch_size` (see `batch_share`)."""
        return batch_share(batch_size, self.world)

    # -- the experts -------------------------------------------------------------------------
    def wrap(self, experts: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
        """The modules a step calls, by name: the experts themselves (one process; FSDP2, which
        shards them in place), or DDP wrappers around them. Call before building the optimiser."""
        if self.strategy == "single":
            return dict(experts)
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device] if self.device.type == "cuda" else None
            return {
                # the gradients live in the all-reduce buckets (no second copy of them)
                n: DistributedDataParallel(
                    e, device_ids=ids, forward_sync_buffers=False, gradient_as_bucket_view=True
                )
                for n, e in experts.items()
            }
        from torch.distributed.device_mesh import init_device_mesh

        self._mesh = init_device_mesh(self.device.type, (self.size,))
        for expert in experts.values():
            # the root's parameters are needed again at once by the backward: keep them gathered
            shard_blocks(
                expert,
                expert.blocks,
                self._mesh,
                mp_policy=bf16_policy() if self.use_bf16 else None,
                reshard_after_forward=self.reshard_after_forward,
                root_reshard_after_forward=False,
                prefetch=False,
            )
        return dict(experts)

    # -- collectives ---------------------------------------------------------------------------
    def gather(self, t: Tensor) -> Tensor:
        """Every rank's (B, ...) share of a batch, joined in rank order: (B * world, ...)."""
        if self.strategy == "single":
            return t
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def mean(self, values: Tensor) -> Tensor:
        """The mean over ranks of a float tensor (one all-reduce)."""
        if self.strategy == "single":
            return values
        values = values.clone()
        dist.all_reduce(values)
        return values / self.size

    def agree(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank (a decision every rank must take together)."""
        if self.strategy == "single":
            return flag
        t = torch.tensor([float(flag)], device=self._comm_device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # -- state ---------------------------------------------------------------------------------
    def full(self, t: Any) -> Any:
        """A whole tensor from a DTensor shard, on the CPU of rank 0 (a collective: every rank
        calls it in the same order; the other ranks get an empty placeholder, so no rank keeps
        more than one whole tensor on its device); anything else as it is."""
        from torch.distributed.tensor import DTensor

        if not isinstance(t, DTensor):
            return t
        whole = t.full_tensor()
        return whole.cpu() if self.is_main else torch.empty(0, dtype=whole.dtype)

    def whole(self, t: Tensor) -> Tensor:
        """A whole tensor from a DTensor on every rank (a collective), or `t` as it is."""
        from torch.distributed.tensor import DTensor

        return t.full_tensor() if isinstance(t, DTensor) else t

    def full_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """`state` (a state_dict, maybe nested) with every DTensor made whole."""
        return {
            k: self.full_state(v) if isinstance(v, Mapping) else self.full(v)
            for k, v in state.items()
        }

    def like_param(self, value: Tensor, param: Tensor) -> Tensor:
        """`value`, a whole tensor every rank holds, sharded as `param` is (FSDP2), else as it
        is (no communication: each rank cuts its own shard)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        if not isinstance(param, DTensor):
            return value
        whole = value.to(param.device)
        return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)

    def sharded_module_state(
        self, module: nn.Module, state: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """A whole state_dict (a checkpoint's) cut to `module`'s shards, for `load_state_dict`."""
        own = module.state_dict()
        return {k: self.like_param(v, own[k]) if k in own else v for k, v in state.items()}

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """`opt.state_dict()` with whole tensors: what a one-process run's optimiser saves."""
        state = opt.state_dict()
        if self.strategy != "fsdp":
            return state
        ids = sorted(state["state"])
        return {**state, "state": {i: self.full_state(state["state"][i]) for i in ids}}

    def load_optimizer_state(self, opt: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
        """Load a whole optimiser state (any world size's) into `opt`, cut to its shards."""
        if self.strategy == "fsdp":
            params = [p for group in opt.param_groups for p in group["params"]]
            per_param = {
                i: {k: v if k == "step" else self.like_param(v, params[i]) for k, v in s.items()}
                for i, s in state["state"].items()
            }
            state = {**state, "state": per_param}
        opt.load_state_dict(state)

    def barrier(self) -> None:
        if self.strategy != "single":
            dist.barrier()
