"""`vidmoe serve`: the HTTP job API and web UI (vidmoe.serve), alone or under torchrun over a
parallel layout (docs/distributed.md, "Serving under torchrun")."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import typer

from vidmoe.cli_args import (
    check_serve_args,
)
from vidmoe.cli_common import (
    ATTENTION_HELP,
    CFG_PARALLEL_HELP,
    DEVICE_HELP,
    MODEL_HELP,
    SHARD_EXPERTS_HELP,
    ULYSSES_HELP,
    _fail,
    _user_errors,
    app,
)


@app.command()
def serve(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to bind; other than loopback needs --token."
    ),
    port: int = typer.Option(7860, "--port", help="TCP port, 1..65535."),
    outputs: Path = typer.Option(
        Path("outputs/serve"), "--outputs", help="Folder for the job database, videos and uploads."
    ),
    max_queue: int = typer.Option(
        64, "--max-queue", help="Jobs waiting at most; more get HTTP 429."
    ),
    token: str | None = typer.Option(
        None,
        "--token",
        help="Bearer token for /v1. A command-line token is visible to other users in `ps`: "
        "prefer the VIDMOE_TOKEN environment variable, which does not show there.",
    ),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help="float32, bfloat16, float16 or auto."),
    residency: str = typer.Option(
        "resident", "--residency", help="resident, swap, disk or blocks (docs/memory.md)."
    ),
    log_level: str = typer.Option("info", "--log-level"),
    allowed_host: list[str] | None = typer.Option(
        None,
        "--allowed-host",
        help="A Host name (NAME or NAME:PORT) accepted beside 127.0.0.1, localhost, [::1] (repeatable).",
    ),
    allowed_origin: list[str] | None = typer.Option(
        None,
        "--allowed-origin",
        help="A web origin (https://NAME[:PORT]) that may change jobs beside the server's own (repeatable).",
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Most denoising steps per job (default: the model's limit)."
    ),
    max_frames: int | None = typer.Option(
        None, "--max-frames", help="Most frames per job (default: the model's limit)."
    ),
    max_pixels: int | None = typer.Option(
        None,
        "--max-pixels",
        help="Most pixels (width x height) per frame (default: the model's limit).",
    ),
    # speed: attention backend and regional compile (models/attention.py)
    attention: str = typer.Option("auto", "--attention", help=ATTENTION_HELP),
    compile: bool = typer.Option(False, "--compile", help="torch.compile each transformer block."),
    # -- under torchrun: rank 0 serves, the others follow (docs/distributed.md) --
    ulysses: int = typer.Option(1, "--ulysses", help=ULYSSES_HELP),
    cfg_parallel: bool = typer.Option(False, "--cfg-parallel", help=CFG_PARALLEL_HELP),
    shard_experts: bool = typer.Option(False, "--shard-experts", help=SHARD_EXPERTS_HELP),
    expert_groups: int = typer.Option(
        1,
        "--expert-groups",
        help="One expert per group of ranks (2 for the Wan2.2 models), requests streamed "
        "through the groups (one node).",
    ),
):
    """Serve the HTTP job API (/v1) and the web UI (/) with a persistent job queue. Under
    torchrun rank 0 serves and the other ranks run each job with it (docs/distributed.md)."""
    import ipaddress

    with _user_errors():
        check_serve_args(port=port, outputs=outputs, max_queue=max_queue, device=device)
    token = token or os.environ.get("VIDMOE_TOKEN") or None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not token:
        _fail(
            ValueError(
                f"binding {host} exposes the server beyond this machine: give --token (or set VIDMOE_TOKEN)"
            )
        )
    try:
        import uvicorn

        from vidmoe.serve.app import ServeConfig, create_app
    except ImportError as e:
        _fail(
            ValueError(
                f"vidmoe serve needs the serve extra ({e.name} is missing): pip install 'vidmoe[serve]'"
            )
        )
    with _user_errors():
        cfg = ServeConfig(
            model=model,
            outputs=outputs,
            max_queue=max_queue,
            token=token,
            device=device,
            dtype=dtype,
            residency=residency,
            allowed_hosts=tuple(allowed_host or ()),
            allowed_origins=tuple(allowed_origin or ()),
            max_steps=max_steps,
            max_num_frames=max_frames,
            max_pixels=max_pixels,
            attention=attention,
            compile=compile,
        )
        split = dict(ulysses=ulysses, cfg_parallel=cfg_parallel, shard_experts=shard_experts)
        layout = _serve_layout(cfg, expert_groups=expert_groups, **split)
        if layout is None:
            application = create_app(cfg)
    if layout is not None:
        _serve_parallel(
            cfg, layout, host=host, port=port, log_level=log_level, shard_experts=shard_experts
        )
        return
    typer.echo(
        f"vidmoe serve: {application.state.config.name} on http://{host}:{port}/ (outputs {outputs})"
    )
    uvicorn.run(application, host=host, port=port, log_level=log_level)


def _serve_layout(cfg, *, ulysses, cfg_parallel, shard_experts, expert_groups):
    """None for one process; under torchrun (os.environ) the checked layout, refused in one
    line before any work when the flags, the model and the launch do not fit."""
    from vidmoe.loading import model_config_for
    from vidmoe.parallel.world import Layout, world_from_env
    from vidmoe.serve.launch import check_team

    world = world_from_env(os.environ)
    layout = Layout(ulysses=ulysses, cfg=2 if cfg_parallel else 1, expert_groups=expert_groups)
    local = os.environ.get("LOCAL_WORLD_SIZE")
    check_team(
        world,
        layout,
        shard_experts=shard_experts,
        config=model_config_for(cfg.model),
        residency=cfg.residency,
        local_world_size=int(local) if local and local.isdigit() else None,
    )
    return None if not world.distributed else layout


def _serve_parallel(cfg, layout, *, host: str, port: int, log_level: str, shard_experts: bool):
    """Rank 0 serves (HTTP, job store, worker); the other ranks follow until it stops."""
    import signal

    import uvicorn

    from vidmoe.parallel.launch import joined
    from vidmoe.serve.app import DB_NAME, create_app
    from vidmoe.serve.distributed import Team, follow_requests, follow_stages, worker_factory
    from vidmoe.serve.launch import model_loader
    from vidmoe.serve.queue import JobStore

    with joined(os.environ, cfg.device) as (world, device):
        team = Team(world=world, device=device, expert_groups=layout.expert_groups)
        load = model_loader(cfg, team, layout, shard_experts=shard_experts)
        if not world.is_main:
            # torchrun passes Ctrl-C / SIGTERM to every rank: rank 0's server stops, finishes
            # its step and tells the others, which leave on that message
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
            if layout.expert_groups == 1:
                follow_requests(team, load)
                return
            store = JobStore(Path(cfg.outputs) / DB_NAME, max_queue=cfg.max_queue)
            follow_stages(team, load, store, Path(cfg.outputs) / "videos")
            return
        with _user_errors():
            application = create_app(cfg, load=load, worker=worker_factory(team))
        typer.echo(
            f"vidmoe serve: {application.state.config.name} on http://{host}:{port}/ (outputs "
            f"{cfg.outputs}; {world.size} processes, layout {dataclasses.asdict(layout)})"
        )
        uvicorn.run(application, host=host, port=port, log_level=log_level)
        application.state.serve.worker.join(60)  # the followers hear the stop message
