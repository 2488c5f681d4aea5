"""Joining the torchrun world for one command: the CLI hands in the launcher's variables and gets
this rank's `World` and device, with the process group started for the command's duration."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from vidmoe.parallel.world import (
    Groups,
    Layout,
    World,
    device_for,
    start,
    stop,
    world_from_env,
)


def check_launch(world: World, layout: Layout, *, verb: str, shard_experts: bool = False) -> None:
    """ValueError unless `world` can run `layout` (one replica; with `shard_experts`, any 2 or
    more ranks): one line naming the flags and how to launch `vidmoe VERB`."""
    if not world.distributed:
        flags = layout.flags(shard_experts=shard_experts)
        need = f"{layout.size}" if layout.size > 1 else "2 or more"
        raise ValueError(
            f"{flags} runs on {need} processes and this is one: launch with `torchrun "
            f"--nproc-per-node {max(layout.size, 2)} -m vidmoe {verb} ...` (docs/distributed.md)"
        )
    if layout.size > 1:
        layout.check(world)


@contextmanager
def joined(
    env: Mapping[str, str], device: str = "auto", *, min_size: int = 1, what: str = ""
) -> Iterator[tuple[World, torch.device]]:
    """This rank's (World, device) with the process group joined; left on exit.

    Args:
        env: the launcher's variables (the CLI passes `os.environ`).
        device: the --device value; under CUDA each rank takes its local rank's GPU.
        min_size: the fewest processes `what` (a flag, for the error) can run on.
    """
    world = world_from_env(env)
    if world.size < min_size:
        raise ValueError(
            f"{what} splits the work over {min_size} or more processes; this run has "
            f"{world.size}: launch it with `torchrun --nproc-per-node {min_size} -m vidmoe ...`"
        )
    dev = device_for(world, device)
    start(world, dev)
    try:
        yield world, dev
    finally:
        stop()


@dataclass(kw_only=True)
class ParallelRun:
    """How one `vidmoe generate` runs on this rank under torchrun (or alone). The process group
    is joined by `join()` (after the cheap checks), and left when the command ends."""

    world: World
    layout: Layout
    device: str
    """This rank's device, for `load_pipeline`."""
    sharding: object | None
    """A `Sharding` for `load_pipeline(shard=...)`, or None when nothing is sharded."""
    groups: Groups | None = None
    """The Ulysses / CFG groups for `Pipeline.set_parallel` (after `join`); None: not split."""

    def join(self) -> None:
        """Join the process group and make the layout's groups (nothing for one process)."""
        if not self.world.distributed:
            return
        start(self.world, torch.device(self.device))
        if self.layout.size > 1:
            self.groups = Groups(self.layout, self.world)


@contextmanager
def parallel_run(
    env: Mapping[str, str],
    device: str,
    layout: Layout,
    *,
    shard_experts: bool = False,
    shard_text_encoder: bool = False,
) -> Iterator[ParallelRun]:
    """The world of a generate command, left when it ends; one process untouched.

    The layout's ranks (Ulysses x CFG) must be the world's; with --shard-experts alone every
    rank runs the same video on its shard of the weights. Refused before any work when the flags
    and the launch do not fit (one line saying how to launch)."""
    if shard_text_encoder and not shard_experts:
        raise ValueError(
            "--shard-text-encoder shards the text encoder beside the experts: add --shard-experts"
        )
    world = world_from_env(env)
    if layout.size == 1 and not shard_experts:
        if world.distributed:
            raise ValueError(
                f"this run has {world.size} processes but nothing splits the work: add "
                "--ulysses N, --cfg-parallel or --shard-experts (docs/distributed.md), or run "
                "without torchrun"
            )
        yield ParallelRun(world=world, layout=layout, device=device, sharding=None)
        return
    check_launch(world, layout, verb="generate", shard_experts=shard_experts)
    sharding = None
    if shard_experts:
        from vidmoe.parallel.fsdp import Sharding

        sharding = Sharding(text_encoder=shard_text_encoder)
    run = ParallelRun(
        world=world, layout=layout, device=str(device_for(world, device)), sharding=sharding
    )
    try:
        yield run
    finally:
        stop()
