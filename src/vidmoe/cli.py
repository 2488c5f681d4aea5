"""The `vidmoe` command line: parse options -> settings -> call the library. No math here.

Every user or environment error ends as one line `error: ...` and exit status 2 (a usage error
detected by the option parser also exits 2); `VIDMOE_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path

import typer

from vidmoe.cli_args import (
    check_device,
    check_image,
    parse_area,
    parse_lora_spec,
    parse_schedule,
)
from vidmoe.cli_common import (
    ATTENTION_HELP,
    BAND_HELP,
    BUDGET_HELP,
    CFG_PARALLEL_HELP,
    DEVICE_HELP,
    EXPERT_GROUPS_HELP,
    EXPERT_HELP,
    MODEL_HELP,
    PROMPTS_HELP,
    QUANTIZE_HELP,
    RECIPE_HELP,
    REWRITE_HELP,
    SHARD_EXPERTS_HELP,
    SIGMAS_HELP,
    TIMESTEPS_HELP,
    ULYSSES_HELP,
    _component_files,
    _load,
    _memory,
    _plan,
    _run,
    _settings,
    _user_errors,
    app,
)


def _parallel(
    *,
    ulysses: int,
    cfg_parallel: bool,
    shard_experts: bool,
    shard_text_encoder: bool,
    device: str,
    batch: Path | None,
):
    """The torchrun world of one generate (os.environ), joined for its duration; refused before
    any work when the flags and the launch do not fit. A batch (--prompts) joins its world in
    `cli_batch.run_batch` instead, as replicas of the layout that each run their share of the
    lines; here it only reads who this rank is."""
    from vidmoe.parallel.launch import ParallelRun, parallel_run
    from vidmoe.parallel.world import Layout, world_from_env

    if batch is not None:
        if shard_text_encoder and not shard_experts:
            raise ValueError(
                "--shard-text-encoder shards the text encoder beside the experts: add "
                "--shard-experts"
            )
        world = world_from_env(os.environ)
        return contextlib.nullcontext(
            ParallelRun(world=world, layout=Layout(), device=device, sharding=None)
        )
    layout = Layout(ulysses=ulysses, cfg=2 if cfg_parallel else 1)
    return parallel_run(
        os.environ,
        device,
        layout,
        shard_experts=shard_experts,
        shard_text_encoder=shard_text_encoder,
    )


def _publish(result, pipe, output: Path, *, recipe: str | None) -> None:
    """Write OUTPUT and OUTPUT.json together (the old pair or the new one, never a mix)."""
    from vidmoe.batch import run_record
    from vidmoe.io.video import publish_video

    record = run_record(result, pipe.source, recipe=recipe)
    if pipe.parallel is not None:
        record["parallel"] = {
            **dataclasses.asdict(pipe.parallel.layout),
            "world_size": pipe.parallel.world.size,
        }
    publish_video(result.frames, record, output, fps=pipe.config.fps)


@app.command()
def generate(
    prompt: str = typer.Argument("", help="The prompt (empty: an unconditional sample)."),
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    negative_prompt: str | None = typer.Option(
        None, "--negative-prompt", "-n", help="Default: the model's."
    ),
    rewrite: bool = typer.Option(True, "--rewrite/--no-rewrite", help=REWRITE_HELP),
    width: int | None = typer.Option(None, "--width", "-W"),
    height: int | None = typer.Option(None, "--height", "-H"),
    frames: int | None = typer.Option(None, "--frames", "-f", help="Frame count, 4k+1."),
    steps: str | None = typer.Option(
        None, "--steps", "-s", help="Steps, or per expert: high_noise=2,low_noise=6."
    ),
    shift: float | None = typer.Option(None, "--shift"),
    sampler: str | None = typer.Option(None, "--sampler", help="euler, unipc or dpm++."),
    guidance: list[str] | None = typer.Option(
        None, "--guidance", "-g", help="Per expert: high_noise=4.0,low_noise=3.0."
    ),
    boundary: str | None = typer.Option(
        None, "--boundary", help="A sigma in (0,1), or release, snr, steps:N."
    ),
    band: float | None = typer.Option(None, "--band", help=BAND_HELP),
    sigmas: str | None = typer.Option(None, "--sigmas", help=SIGMAS_HELP),
    timesteps: str | None = typer.Option(None, "--timesteps", help=TIMESTEPS_HELP),
    seed: int = typer.Option(0, "--seed"),
    image: Path | None = typer.Option(None, "--image", "-i", help="First frame (i2v, ti2v)."),
    output: Path = typer.Option(
        Path("outputs/video.mp4"),
        "--output",
        "-o",
        help="The video (.mp4); its record goes to OUTPUT.json.",
    ),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help="float32, bfloat16, float16 or auto."),
    residency: str = typer.Option(
        "resident", "--residency", help="resident, swap, disk or blocks (docs/memory.md)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    lora: list[str] | None = typer.Option(
        None,
        "--lora",
        help="LoRA file, repeatable: FILE, FILE:0.8, high_noise=FILE:0.8 (bare: both experts).",
    ),
    lora_strict: str = typer.Option(
        "on", "--lora-strict", help="on: unmatched LoRA tensors are an error; off: warn."
    ),
    fuse_lora: bool = typer.Option(
        False, "--fuse-lora", help="Merge the LoRAs into the weights before sampling."
    ),
    recipe: str | None = typer.Option(None, "--recipe", help=RECIPE_HELP),
    step_cache: str | None = typer.Option(
        None,
        "--step-cache",
        help="Skip most blocks at steps whose first block barely moved: a threshold (relative "
        "change, e.g. 0.1) for every expert, or per expert: high_noise=0.05,low_noise=0.1. Off "
        "by default.",
    ),
    quantize: str | None = typer.Option(None, "--quantize", help=QUANTIZE_HELP),
    area: str | None = typer.Option(
        None,
        "--area",
        help="i2v, ti2v with --image: frame area W*H (e.g. 832*480); the size follows the image's "
        "aspect ratio as in the release. Default: the model's width x height. Not with -W/-H.",
    ),
    # components from separate files (docs/checkpoints.md)
    expert: list[str] | None = typer.Option(None, "--expert", help=EXPERT_HELP),
    vae: Path | None = typer.Option(
        None,
        "--vae",
        help="VAE file: Wan2.1_VAE.pth, wan_2.1_vae.safetensors or a diffusers vae/ folder.",
    ),
    text_encoder: Path | None = typer.Option(
        None,
        "--text-encoder",
        help="umT5 file: the release .pth, umt5_xxl_fp16 / umt5_xxl_fp8_e4m3fn_scaled .safetensors (tokenizer beside it) or a diffusers text_encoder/ folder.",
    ),
    # speed: attention backend and regional compile (models/attention.py)
    attention: str = typer.Option("auto", "--attention", help=ATTENTION_HELP),
    compile: bool = typer.Option(
        False, "--compile", help="torch.compile each transformer block (first step is slower)."
    ),
    # -- the memory planner (vidmoe/planner.py) --
    memory_budget: str | None = typer.Option(None, "--memory-budget", help=BUDGET_HELP),
    # -- parallel inference under torchrun (docs/distributed.md) --
    ulysses: int = typer.Option(1, "--ulysses", help=ULYSSES_HELP),
    cfg_parallel: bool = typer.Option(False, "--cfg-parallel", help=CFG_PARALLEL_HELP),
    # -- weights sharded over the torchrun ranks with FSDP2 (vidmoe.parallel.fsdp) --
    shard_experts: bool = typer.Option(False, "--shard-experts", help=SHARD_EXPERTS_HELP),
    shard_text_encoder: bool = typer.Option(
        False, "--shard-text-encoder", help="With --shard-experts: shard the text encoder too."
    ),
    # -- batch generation and expert-pipelined groups (vidmoe/batch.py, docs/distributed.md) --
    prompts: Path | None = typer.Option(None, "--prompts", help=PROMPTS_HELP),
    expert_groups: int = typer.Option(1, "--expert-groups", help=EXPERT_GROUPS_HELP),
):
    """Generate a video; writes OUTPUT (mp4) and OUTPUT.json (settings, plan, trace) together.
    Under torchrun every rank computes and rank 0 alone writes. With --prompts FILE, generate
    one video per line into the folder OUTPUT."""
    from vidmoe.io.video import check_video_path

    split = dict(ulysses=ulysses, cfg_parallel=cfg_parallel, shard_experts=shard_experts)
    with (
        _user_errors(),
        _parallel(
            **split, shard_text_encoder=shard_text_encoder, device=device, batch=prompts
        ) as run,
    ):
        quiet, device = quiet or not run.world.is_main, run.device  # rank 0 speaks and writes
        if prompts is None:
            check_video_path(output)  # before any work: a bad path must not cost a generation
            if expert_groups != 1:
                raise ValueError("--expert-groups pipelines a batch: give --prompts FILE")
        check_device(device)
        if image is not None:
            check_image(image)
        if lora_strict not in ("on", "off"):
            raise ValueError(f"--lora-strict must be on or off; got {lora_strict!r}")
        s = _settings(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            frames=frames,
            steps=steps,
            shift=shift,
            sampler=sampler,
            guidance=guidance,
            boundary=boundary,
            band=band,
            sigmas=parse_schedule(sigmas=sigmas, timesteps=timesteps),
            seed=seed,
            image=image,
            recipe=recipe,
            step_cache=step_cache,
        )
        if area is not None:
            s = dataclasses.replace(s, area=parse_area(area))
        s = dataclasses.replace(s, rewrite_prompt=rewrite)
        loras = [parse_lora_spec(item) for item in lora or []]
        files = _component_files(expert, vae, text_encoder)
        if prompts is not None:
            from vidmoe.cli_batch import run_batch
            from vidmoe.parallel.world import Layout

            load = dict(device=device, dtype=dtype, residency=residency, loras=loras)
            load |= dict(lora_strict=lora_strict, fuse_lora=fuse_lora, quiet=quiet)
            load |= dict(quantize=quantize, files=files, attention=attention, compile=compile)
            ok = run_batch(
                prompts=prompts,
                prompt=prompt,
                defaults=s,
                model=model,
                output=output,
                layout=Layout(
                    ulysses=ulysses, cfg=2 if cfg_parallel else 1, expert_groups=expert_groups
                ),
                shard_experts=shard_experts,
                shard_text_encoder=shard_text_encoder,
                memory_budget=memory_budget,
                recipe=recipe,
                load=load,
                loader=_load,
            )
            raise typer.Exit(0 if ok else 1)
        plan_, rs, config = _plan(s, model, files=files, full=True)
        if not quiet:
            typer.echo(plan_.summary())
        if memory_budget is not None:  # the fastest residency that fits, before anything loads
            chosen = _memory(
                config,
                rs,
                device=device,
                dtype=dtype,
                residency=residency,
                quantize=quantize,
                budget=memory_budget,
                runnable=True,
            ).request
            residency, quantize = chosen.residency, chosen.quantize
            if not quiet:
                typer.echo(
                    f"memory budget {memory_budget}: residency {residency}, weights "
                    f"{quantize or 'as stored'}"
                )
        elif quantize == "auto":
            quantize = None  # auto quantises only where a memory budget needs it
        from vidmoe.parallel.ulysses import check_model_heads

        check_model_heads(config, ulysses)
        run.join()
        pipe = _load(
            model,
            device=device,
            dtype=dtype,
            residency=residency,
            loras=loras,
            lora_strict=lora_strict,
            fuse_lora=fuse_lora,
            quiet=quiet,
            quantize=quantize,
            files=files,
            attention=attention,
            compile=compile,
            shard=run.sharding,
        )
        if run.groups is not None:
            pipe.set_parallel(run.groups)
        if not quiet and (said := pipe.resolve(s).encoded_prompt) is not None:
            typer.echo(
                f"prompt rewritten with the model's lexicon (--no-rewrite: as given): {said}"
            )
        result = _run(pipe, s, quiet=quiet, output="frames" if run.world.is_main else "latents")
        if run.world.is_main:
            _publish(result, pipe, output, recipe=recipe)
    if not run.world.is_main:
        return
    t, h, w, _ = result.frames.shape
    typer.echo(
        f"wrote {output} ({t} frames, {w}x{h}, {pipe.config.fps} fps) in {sum(result.timings.values()):.1f}s"
    )


from vidmoe import cli_plan, cli_serve, cli_train  # noqa: E402, F401  (registers their verbs)


def main() -> None:
    """The console entry point: any error not handled above is still one line, unless VIDMOE_DEBUG."""
    if os.environ.get("VIDMOE_DEBUG"):
        app()
        return
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # an internal error: one line, and how to see the traceback
        message = " ".join(str(e).split())
        print(
            f"error: {type(e).__name__}: {message} (VIDMOE_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
