"""Launching `vidmoe serve` under torchrun: the checks that refuse a launch that cannot serve
(one line, before anything loads) and what each rank loads. The ranks' work once loaded is
`serve/distributed.py`'s."""

from __future__ import annotations

from collections.abc import Callable

from vidmoe.parallel.pipelined import Stage
from vidmoe.parallel.world import Layout, World
from vidmoe.serve.distributed import Team


def check_team(
    world: World,
    layout: Layout,
    *,
    shard_experts: bool,
    config,
    residency: str,
    local_world_size: int | None,
) -> None:
    """ValueError (one line, with the fix) unless `vidmoe serve` can run `layout` on `world`.

    Args:
        layout: expert groups x cfg x ulysses (one replica: the server has one queue).
        local_world_size: the processes on this node (torchrun's LOCAL_WORLD_SIZE), None if
            unknown: expert groups need one node, their writer shares rank 0's job store.
    """
    from vidmoe.parallel.launch import check_launch
    from vidmoe.parallel.pipelined import check_pipelined
    from vidmoe.parallel.ulysses import check_model_heads

    if not layout.flags(shard_experts=shard_experts):
        if world.distributed:
            raise ValueError(
                f"this server has {world.size} processes but nothing splits the work: add "
                "--ulysses N, --cfg-parallel, --shard-experts or --expert-groups 2 "
                "(docs/distributed.md), or run `vidmoe serve` without torchrun"
            )
        return
    check_launch(world, layout, verb="serve", shard_experts=shard_experts)
    check_model_heads(config, layout.ulysses)
    if layout.expert_groups == 1:
        return
    check_pipelined(config, layout.expert_groups)
    if shard_experts or residency != "resident":
        what = "--shard-experts" if shard_experts else f"--residency {residency}"
        raise ValueError(
            f"--expert-groups holds one expert resident per group; {what} is not supported "
            "with it: drop it, or serve without --expert-groups"
        )
    if local_world_size is not None and local_world_size != world.size:
        raise ValueError(
            f"--expert-groups serves from one node (the last group writes the videos and job "
            f"rows into rank 0's --outputs folder); this run has {local_world_size} of its "
            f"{world.size} processes on this node: launch all {world.size} on one node"
        )


def model_loader(cfg, team: Team, layout: Layout, *, shard_experts: bool) -> Callable:
    """What each rank loads, as `vidmoe generate` does under torchrun: with expert groups this
    rank's `Stage` (`load_stage`), else the whole pipeline (sharded with --shard-experts) split
    over the layout's groups (`Pipeline.set_parallel`). `cfg` is the `ServeConfig`."""
    options = dict(dtype=cfg.dtype, residency=cfg.residency)
    options |= dict(attention=cfg.attention, compile=cfg.compile)

    def load_pipelined() -> Stage:
        from vidmoe.parallel.pipelined import load_stage

        return load_stage(cfg.model, team.world, layout=layout, device=team.device, load=options)

    def load_split():
        from vidmoe.loading import load_pipeline
        from vidmoe.parallel.fsdp import Sharding
        from vidmoe.parallel.world import Groups

        groups = Groups(layout, team.world) if layout.size > 1 else None
        shard = {"shard": Sharding()} if shard_experts else {}
        pipe = load_pipeline(cfg.model, device=str(team.device), **options, **shard)
        if groups is not None:
            pipe.set_parallel(groups)
        return pipe

    return load_pipelined if layout.expert_groups > 1 else load_split
