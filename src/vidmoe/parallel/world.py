"""The process world under torchrun and the parallel layout of a run.

`World` is who this process is (rank, world size, local rank), read from the launcher's
variables by the caller (the CLI passes `os.environ`; library code never reads it). `Layout` is
how a run splits the world: replicas x expert groups x CFG ranks x Ulysses ranks, their product
the world size. A replica is one whole copy of the model that runs its own requests (a batch's
prompts are dealt out over the replicas); inside it the other three split each request. `Groups`
holds the torch.distributed groups of one layout, made once on every rank.

Rank order: rank = ((replica * expert_groups + expert_group) * cfg + cfg_rank) * ulysses +
ulysses_rank, so a Ulysses group is a run of neighbouring ranks (on one node when it fits, where
its all-to-alls are cheapest) and a replica is a run of neighbouring ranks too.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True, kw_only=True)
class World:
    """This process in the run: rank `rank` of `size`, `local_rank` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size or self.local_rank < 0:
            raise ValueError(
                f"rank {self.rank} of world size {self.size} (local rank {self.local_rank}) is "
                "not a valid place: need 0 <= rank < world size and local rank >= 0"
            )

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0


def world_from_env(env: Mapping[str, str]) -> World:
    """The `World` torchrun describes in `env` (RANK, WORLD_SIZE, LOCAL_RANK); a single process
    when none is set. A partial or non-integer set is a ValueError naming the variable."""
    present = [k for k in LAUNCH_VARS if k in env]
    if not present:
        return World()
    if "LOCAL_RANK" not in env and set(present) == {"RANK", "WORLD_SIZE"}:
        env = {**env, "LOCAL_RANK": env["RANK"]}
    missing = [k for k in LAUNCH_VARS if k not in env]
    if missing:
        raise ValueError(
            f"torchrun sets {', '.join(LAUNCH_VARS)} together; {', '.join(present)} set but "
            f"{', '.join(missing)} missing: launch with `torchrun --nproc-per-node N -m vidmoe ...`"
        )
    values = {}
    for k in LAUNCH_VARS:
        try:
            values[k] = int(env[k])
        except ValueError:
            raise ValueError(f"{k} must be an integer; got {env[k]!r}") from None
    return World(rank=values["RANK"], size=values["WORLD_SIZE"], local_rank=values["LOCAL_RANK"])


def device_for(world: World, device: str | torch.device = "auto") -> torch.device:
    """This rank's device: on CUDA the local rank's GPU (unless `device` names one), else CPU."""
    from vidmoe.devices import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and world.distributed:
        dev = torch.device("cuda", world.local_rank)
    return dev


def start(
    world: World,
    device: torch.device,
    *,
    init_method: str | None = None,
    timeout_s: float = 1800.0,
) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU) unless single or already joined.

    `init_method` defaults to torchrun's `env://` rendezvous; tests pass a `file://` one."""
    if not world.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        init_method=init_method,
        rank=world.rank,
        world_size=world.size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def sum_over(group) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that returns a tensor summed over the ranks of `group` (None: the whole
    world); e.g. `StepCache.reduce`, so that every rank that runs an expert measures alike."""

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    return reduce


def stop() -> None:
    """Leave the process group, if one was joined (idempotent)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True, kw_only=True)
class Layout:
    """How a run splits the world: `replicas` x `expert_groups` x `cfg` x `ulysses` ranks.

    ulysses: ranks sharing one sequence (attention heads split by all-to-all).
    cfg: 2 puts the conditional and unconditional passes on different ranks; 1 batches them.
    expert_groups: 1 (every rank holds every expert it runs) or the number of experts (each group
        holds one expert and requests flow through the groups in turn).
    replicas: whole copies of that arrangement, each running its own requests (batches only).
    """

    ulysses: int = 1
    cfg: int = 1
    expert_groups: int = 1
    replicas: int = 1

    def __post_init__(self):
        for name in ("ulysses", "cfg", "expert_groups", "replicas"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}")
        if self.cfg not in (1, 2):
            raise ValueError(f"cfg parallel splits cond and uncond: cfg is 1 or 2; got {self.cfg}")

    @property
    def replica_size(self) -> int:
        """The ranks of one replica: expert groups x cfg x ulysses."""
        return self.expert_groups * self.cfg * self.ulysses

    @property
    def size(self) -> int:
        return self.replicas * self.replica_size

    def check(self, world: World) -> None:
        """ValueError unless the layout's product is the world size."""
        if self.size != world.size:
            copies = f"{self.replicas} replicas x " if self.replicas > 1 else ""
            raise ValueError(
                f"the parallel layout needs {self.size} processes ({copies}expert groups "
                f"{self.expert_groups} x cfg {self.cfg} x ulysses {self.ulysses}) but the world "
                f"has {world.size}: launch with `torchrun --nproc-per-node {self.size}` or change "
                "--ulysses / --cfg-parallel / --expert-groups"
            )

    def flags(self, *, shard_experts: bool = False) -> str:
        """The command-line flags that ask for this layout (one replica), for messages."""
        return " ".join(
            [f"--ulysses {self.ulysses}"] * (self.ulysses > 1)
            + ["--cfg-parallel"] * (self.cfg > 1)
            + [f"--expert-groups {self.expert_groups}"] * (self.expert_groups > 1)
            + ["--shard-experts"] * shard_experts
        )

    def filling(self, world: World) -> Layout:
        """This layout with as many replicas as `world` holds (a batch deals its prompts out
        over them); ValueError unless the world size is a multiple of one replica's."""
        if world.size % self.replica_size:
            raise ValueError(
                f"one copy of the layout takes {self.replica_size} processes (expert groups "
                f"{self.expert_groups} x cfg {self.cfg} x ulysses {self.ulysses}) and the world "
                f"has {world.size}, not a multiple: launch a multiple of {self.replica_size} "
                "processes or change --ulysses / --cfg-parallel / --expert-groups"
            )
        return dataclasses.replace(self, replicas=world.size // self.replica_size)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(expert_group, cfg_rank, ulysses_rank) of a global rank, inside its replica."""
        group, rest = divmod(rank % self.replica_size, self.cfg * self.ulysses)
        c, u = divmod(rest, self.ulysses)
        return group, c, u

    def replica_of(self, rank: int) -> int:
        return rank // self.replica_size

    def rank_of(self, group: int, c: int, u: int, replica: int = 0) -> int:
        return ((replica * self.expert_groups + group) * self.cfg + c) * self.ulysses + u


@dataclass(frozen=True, kw_only=True)
class Place:
    """This rank's coordinates in a layout."""

    expert_group: int
    cfg_rank: int
    ulysses_rank: int
    replica: int = 0


class Groups:
    """The torch.distributed groups of one layout, created on every rank in the same order (as
    `dist.new_group` requires). Single-process: every group is None and sizes are 1."""

    def __init__(self, layout: Layout, world: World):
        layout.check(world)
        self.layout, self.world = layout, world
        g, c, u = layout.coords(world.rank)
        r = layout.replica_of(world.rank)
        self.place = Place(expert_group=g, cfg_rank=c, ulysses_rank=u, replica=r)
        self.ulysses = self.cfg = self.expert_group = self.replica = None
        if not world.distributed:
            return
        L = layout
        for ri in range(L.replicas):
            for gi in range(L.expert_groups):
                for ci in range(L.cfg):
                    ranks = [L.rank_of(gi, ci, ui, ri) for ui in range(L.ulysses)]
                    group = dist.new_group(ranks) if L.ulysses > 1 else None
                    if (ri, gi, ci) == (r, g, c):
                        self.ulysses = group
                for ui in range(L.ulysses):
                    ranks = [L.rank_of(gi, ci, ui, ri) for ci in range(L.cfg)]
                    group = dist.new_group(ranks) if L.cfg > 1 else None
                    if (ri, gi, ui) == (r, g, u):
                        self.cfg = group
                ranks = [
                    L.rank_of(gi, ci, ui, ri) for ci in range(L.cfg) for ui in range(L.ulysses)
                ]
                whole = L.expert_groups == 1 and L.replicas == 1  # the world's default group
                group = dist.new_group(ranks) if len(ranks) > 1 and not whole else None
                if (ri, gi) == (r, g):
                    self.expert_group = group
            ranks = list(range(ri * L.replica_size, (ri + 1) * L.replica_size))
            group = dist.new_group(ranks) if L.replicas > 1 and len(ranks) > 1 else None
            if ri == r:
                self.replica = group

    @cached_property
    def group_ranks(self) -> list[int]:
        """The global ranks of this rank's expert group, in order."""
        L, p = self.layout, self.place
        return [
            L.rank_of(p.expert_group, c, u, p.replica)
            for c in range(L.cfg)
            for u in range(L.ulysses)
        ]

    @property
    def replica_main(self) -> int:
        """The first rank of this rank's replica (writes what the replica makes)."""
        return self.layout.rank_of(0, 0, 0, self.place.replica)

    @property
    def replica_ranks(self) -> list[int]:
        n = self.layout.replica_size
        return list(range(self.place.replica * n, (self.place.replica + 1) * n))
