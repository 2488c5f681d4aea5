"""Joining the torchrun world for one command: the CLI hands in the launcher's variables and gets
this rank's `World` and device, with the process group started for the command's duration."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from vidmoe.parallel.world import World, device_for, start, stop, world_from_env


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


@dataclass(frozen=True, kw_only=True)
class ShardRun:
    """How `vidmoe generate --shard-experts` runs on this rank."""

    world: World
    device: str
    """This rank's device, for `load_pipeline`."""
    sharding: object | None
    """A `Sharding` for `load_pipeline(shard=...)`, or None when nothing is sharded."""


@contextmanager
def shard_run(
    env: Mapping[str, str], device: str, *, experts: bool, text_encoder: bool
) -> Iterator[ShardRun]:
    """The world of a generate command with --shard-experts (joined for its duration), or a
    single process untouched when no weights are sharded."""
    if text_encoder and not experts:
        raise ValueError(
            "--shard-text-encoder shards the text encoder beside the experts: add --shard-experts"
        )
    if not experts:
        yield ShardRun(world=World(), device=device, sharding=None)
        return
    from vidmoe.parallel.fsdp import Sharding

    with joined(env, device, min_size=2, what="--shard-experts") as (world, dev):
        yield ShardRun(world=world, device=str(dev), sharding=Sharding(text_encoder=text_encoder))
