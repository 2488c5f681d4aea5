"""`vidmoe info` and `vidmoe plan`: what a model is and what a request would cost (the plan,
the memory planner's choice), before anything loads."""

from __future__ import annotations

import typer

from vidmoe.cli_args import (
    parse_schedule,
)
from vidmoe.cli_common import (
    BAND_HELP,
    BUDGET_HELP,
    DEVICE_HELP,
    MODEL_HELP,
    QUANTIZE_HELP,
    RECIPE_HELP,
    RESIDENCY_HELP,
    SHARD_EXPERTS_HELP,
    SIGMAS_HELP,
    TIMESTEPS_HELP,
    _memory,
    _plan,
    _settings,
    _user_errors,
    app,
)


@app.command()
def info(model: str | None = typer.Argument(None, help=MODEL_HELP)):
    """Print the experts, parameters (total and active per step), boundary and default plan."""
    from vidmoe.loading import describe_model

    with _user_errors():
        typer.echo(describe_model(model))


@app.command()
def plan(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
    steps: str | None = typer.Option(None, "--steps", "-s"),
    shift: float | None = typer.Option(None, "--shift"),
    guidance: list[str] | None = typer.Option(None, "--guidance", "-g"),
    boundary: str | None = typer.Option(None, "--boundary"),
    band: float | None = typer.Option(None, "--band", help=BAND_HELP),
    sigmas: str | None = typer.Option(None, "--sigmas", help=SIGMAS_HELP),
    timesteps: str | None = typer.Option(None, "--timesteps", help=TIMESTEPS_HELP),
    recipe: str | None = typer.Option(None, "--recipe", help=RECIPE_HELP),
    # -- the memory planner (vidmoe/planner.py) --
    width: int | None = typer.Option(None, "--width", "-W"),
    height: int | None = typer.Option(None, "--height", "-H"),
    frames: int | None = typer.Option(None, "--frames", "-f", help="Frame count, 4k+1."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help="float32, bfloat16, float16 or auto."),
    residency: str = typer.Option("resident", "--residency", help=RESIDENCY_HELP),
    quantize: str | None = typer.Option(None, "--quantize", help=QUANTIZE_HELP),
    memory_budget: str | None = typer.Option(None, "--memory-budget", help=BUDGET_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the plan and its memory as JSON."),
    # -- memory per rank of a parallel run (vidmoe.parallel.memory) --
    ulysses: int = typer.Option(1, "--ulysses", help="Ranks sharing one sequence (Ulysses)."),
    cfg_parallel: bool = typer.Option(False, "--cfg-parallel", help="Cond and uncond on 2 ranks."),
    expert_groups: int = typer.Option(1, "--expert-groups", help="Groups, one expert each."),
    shard_experts: bool = typer.Option(False, "--shard-experts", help=SHARD_EXPERTS_HELP),
    shard_text_encoder: bool = typer.Option(
        False, "--shard-text-encoder", help="With --shard-experts: shard the text encoder too."
    ),
):
    """Print the per-step plan (boundary, steps per expert, guidance) and the predicted memory."""
    import json

    from vidmoe.parallel.memory import per_rank_memory
    from vidmoe.parallel.world import Layout

    with _user_errors():
        s = _settings(
            steps=steps,
            shift=shift,
            guidance=guidance,
            boundary=boundary,
            band=band,
            sigmas=parse_schedule(sigmas=sigmas, timesteps=timesteps),
            recipe=recipe,
            width=width,
            height=height,
            frames=frames,
        )
        plan_, rs, config = _plan(s, model, any_image=True, full=True)
        memory = _memory(
            config,
            rs,
            device=device,
            dtype=dtype,
            residency=residency,
            quantize=quantize,
            budget=memory_budget,
        )
        layout = Layout(ulysses=ulysses, cfg=2 if cfg_parallel else 1, expert_groups=expert_groups)
        per_rank = None
        if layout.size > 1 or shard_experts or shard_text_encoder:
            per_rank = per_rank_memory(
                config,
                memory.request,
                layout,
                shard_experts=shard_experts,
                shard_text_encoder=shard_text_encoder,
            )
    if as_json:
        record = {"plan": plan_.to_dict(), "settings": rs.to_dict(), "memory": memory.to_dict()}
        if per_rank is not None:
            record["per_rank"] = per_rank.to_dict()
        typer.echo(json.dumps(record, indent=2))
    else:
        typer.echo(plan_.summary())
        typer.echo(memory.summary())
        if per_rank is not None:
            typer.echo(per_rank.summary())
