"""`vidmoe generate --prompts FILE`: the batch path of the generate command (parse -> library).

Reads torchrun's variables (library code does not), joins the process group, loads the model
(every expert on every rank, or one expert per group with --expert-groups) and runs the batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

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


def run_batch(
    *,
    prompts: Path,
    prompt: str,
    defaults,
    model: str | None,
    output: Path,
    expert_groups: int,
    memory_budget: str | None,
    recipe: str | None,
    load: dict,
    loader,
) -> bool:
    """Run a prompts file; True when no line failed. `load` holds `loader`'s keyword options
    (the generate command's `_load`)."""
    from vidmoe.batch import generate_batch, read_jobs
    from vidmoe.parallel.launch import joined

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
    jobs = read_jobs(prompts, defaults)
    quiet = load["quiet"]
    with joined(os.environ, load["device"]) as (world, device):
        if expert_groups == 1:
            pipe = loader(model, **{**load, "device": str(device)})
            report = generate_batch(
                pipe,
                jobs,
                out_dir,
                world=world,
                progress=not quiet,
                recipe=recipe,
                log=lambda m: typer.secho(m, fg=typer.colors.RED, err=True),
            )
        else:
            from vidmoe.parallel.pipelined import generate_pipelined, load_stage
            from vidmoe.parallel.world import Layout

            layout = Layout(expert_groups=expert_groups)
            stage = load_stage(model, world, layout=layout, device=device, load=load)
            report = generate_pipelined(
                stage,
                jobs,
                out_dir,
                progress=not quiet,
                recipe=recipe,
                log=lambda m: typer.secho(m, fg=typer.colors.RED, err=True),
            )
    if world.is_main:
        typer.echo(report.summary())
        typer.echo(f"record: {out_dir / 'batch.jsonl'}")
    return report.ok
