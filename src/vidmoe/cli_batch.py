"""`vidmoe generate --prompts FILE`: the batch path of the generate command (parse -> library).

Reads torchrun's variables (library code does not), joins the process group, lays the world out
as replicas of one --expert-groups x --cfg-parallel x --ulysses layout, loads the model (every
expert on every rank of a replica, or one expert per group with --expert-groups; sharded over
the ranks that run one video together with --shard-experts) and runs the batch.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import typer

from vidmoe.parallel.world import Layout, World

DEFAULT_OUTPUT = Path("outputs/video.mp4")


def batch_folder(output: Path) -> Path:
    """The batch's output folder from -o: the default video name means outputs/batch."""
    if output == DEFAULT_OUTPUT:
        return Path("outputs/batch")
    if output.suffix.lower() == ".mp4" or (output.exists() and not output.is_dir()):
        raise ValueError(
            f"with --prompts, -o names a folder for the videos; got {str(output)!r}: "
            f"use e.g. {str(output.with_suffix(''))!r}"
        )
    return output


def batch_layout(one: Layout, world: World, *, shard_experts: bool = False) -> Layout:
    """The batch's layout on `world`: as many replicas of `one` (a replica: expert groups x cfg
    x ulysses ranks that run one video together) as the world holds. Refused in one line when
    the launch does not fit."""
    flags = one.flags()
    n = one.replica_size
    if n > 1 and not world.distributed:
        raise ValueError(
            f"{flags} with --prompts needs {n} processes per replica and this is one: launch "
            f"with `torchrun --nproc-per-node {n} -m vidmoe generate --prompts ...` (a multiple "
            f"of {n} runs that many replicas, each on its share of the lines; docs/distributed.md)"
        )
    if shard_experts and one.cfg * one.ulysses == 1:
        raise ValueError(
            "--shard-experts with --prompts shards the weights over the ranks that run one video "
            "together (--ulysses N, --cfg-parallel; inside each expert group), and here that is "
            "one rank: add --ulysses 2 or --cfg-parallel, or drop --shard-experts"
        )
    return one.filling(world)


def _check_heads(model, files: dict | None, ulysses: int) -> None:
    """Every expert's heads must split over the Ulysses ranks (read from the config only)."""
    from vidmoe.loading import model_config_for, model_config_for_files
    from vidmoe.parallel.ulysses import check_model_heads

    if files:
        config = model_config_for_files(model, experts=files["experts"], vae=files["vae"])
    else:
        config = model_config_for(model)
    check_model_heads(config, ulysses)


def run_batch(
    *,
    prompts: Path,
    prompt: str,
    defaults,
    model: str | None,
    output: Path,
    layout: Layout,
    shard_experts: bool = False,
    shard_text_encoder: bool = False,
    memory_budget: str | None,
    recipe: str | None,
    load: dict,
    loader,
) -> bool:
    """Run a prompts file; True when no line failed.

    Args:
        layout: one replica (expert groups x cfg x ulysses); the world holds a multiple of it.
        shard_experts: each replica's weights sharded over the ranks that run one
            video together (FSDP2); `shard_text_encoder` the text encoder too.
        load: `loader`'s keyword options (the generate command's `_load`).
    """
    from vidmoe.batch import generate_batch, read_jobs
    from vidmoe.parallel.launch import joined
    from vidmoe.parallel.world import Groups, world_from_env

    if prompt:
        raise ValueError(
            f"give a prompt or --prompts FILE, not both; got the prompt {prompt!r} and "
            f"--prompts {prompts}: put the prompt in the file"
        )
    if memory_budget is not None:
        raise ValueError("--memory-budget is not supported with --prompts yet: give --residency")
    out_dir = batch_folder(output)
    if load.get("quantize") == "auto":
        load = {**load, "quantize": None}  # auto quantises only where a memory budget needs it
    layout = batch_layout(layout, world_from_env(os.environ), shard_experts=shard_experts)
    if layout.ulysses > 1:  # every expert's heads split over the Ulysses ranks, before loading
        _check_heads(model, load.get("files"), layout.ulysses)
    sharding = None
    if shard_experts:
        from vidmoe.parallel.fsdp import Sharding

        sharding = Sharding(text_encoder=shard_text_encoder)
    jobs = read_jobs(prompts, defaults)
    said = dict(
        progress=not load["quiet"],
        recipe=recipe,
        log=lambda m: typer.secho(m, fg=typer.colors.RED, err=True),
    )
    with joined(os.environ, load["device"]) as (world, device):
        if layout.expert_groups == 1:
            groups = Groups(layout, world)
            if sharding is not None:  # over the replica's ranks (the world's: one replica)
                sharding = dataclasses.replace(sharding, group=groups.expert_group)
            pipe = loader(model, **{**load, "device": str(device)}, shard=sharding)
            if layout.replica_size > 1:
                pipe.set_parallel(groups)
            report = generate_batch(pipe, jobs, out_dir, groups=groups, **said)
        else:
            from vidmoe.parallel.pipelined import generate_pipelined, load_stage

            stage = load_stage(
                model, world, layout=layout, device=device, load=load, shard=sharding
            )
            report = generate_pipelined(stage, jobs, out_dir, **said)
    if world.is_main:
        typer.echo(report.summary())
        typer.echo(f"record: {out_dir / 'batch.jsonl'}")
    return report.ok
