"""The `vidmoe` command line: parse options -> settings -> call the library. No math here.

Every user or environment error ends as one line `error: ...` and exit status 2 (a usage error
detected by the option parser also exits 2); `VIDMOE_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import typer

from vidmoe.cli_args import (
    check_device,
    check_image,
    check_serve_args,
    parse_area,
    parse_lora_spec,
    parse_per_expert,
    parse_schedule,
    parse_step_cache,
    parse_steps,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Mixture-of-Experts video diffusion (Wan2.2 style).",
)

MODEL_HELP = "Checkpoint folder or file (official, diffusers, ComfyUI or vidmoe layout), or a preset name. Default: the shipped demo model."
SIGMAS_HELP = (
    "Explicit descending sigma list in [0, 1]: 1,0.75,0.5,0.25 (replaces --steps and --shift)."
)
TIMESTEPS_HELP = (
    "Explicit descending timestep list in [0, 1000] (= 1000 x sigma): 1000,750,500,250."
)
BAND_HELP = "Transition band half-width (sigma) around each boundary; 0 switches hard."
RECIPE_HELP = "Few-step recipe, e.g. lightning-4step."
DEVICE_HELP = "cpu, cuda, cuda:N or auto."
EXPERT_HELP = "An expert from its own file, repeatable: high_noise=FILE (official, diffusers, ComfyUI bf16/fp16/fp8/fp8_scaled, or .gguf); on top of --model, or alone with --vae and --text-encoder."


def _component_files(
    expert: list[str] | None, vae: Path | None, text_encoder: Path | None
) -> dict | None:
    """`load_pipeline`'s experts/vae/text_encoder from --expert NAME=FILE, --vae, --text-encoder."""
    if not expert and vae is None and text_encoder is None:
        return None
    experts: dict[str, Path] = {}
    for item in expert or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(
                f"--expert takes NAME=FILE (e.g. high_noise=wan_high.safetensors); got {item!r}"
            )
        if name in experts:
            raise ValueError(f"--expert {name} is given twice ({experts[name]} and {path})")
        experts[name] = Path(path)
    return {"experts": experts, "vae": vae, "text_encoder": text_encoder}


ATTENTION_HELP = (
    "auto (flash-attn on CUDA in bf16/fp16 when installed, else sdpa), sdpa, flash or sage."
)
RESIDENCY_HELP = "resident, swap, blocks or disk (where the idle experts wait)."
QUANTIZE_HELP = "fp8: e4m3 block weights; auto: fp8 only where a --memory-budget needs it."
BUDGET_HELP = "host=24GB,device=24GB: pick the fastest policy that fits, or refuse (exit 2)."
ULYSSES_HELP = "Sequence-parallel ranks per video (attention heads split by all-to-all); under torchrun (docs/distributed.md)."
CFG_PARALLEL_HELP = "Run cond and uncond on different ranks (doubles the ranks); under torchrun."
SHARD_EXPERTS_HELP = (
    "Under torchrun: each rank holds 1/N of every expert (FSDP2), gathering one block at a time."
)
PROMPTS_HELP = (
    "A prompts file: text (one prompt per line, # comments) or JSONL (prompt plus any setting, "
    "and a name, per line); the other options are every line's defaults; -o is then a folder. "
    "Finished videos are skipped on restart; exit 1 if any line failed. Under torchrun the "
    "lines are dealt out over replicas of the layout (--ulysses x --cfg-parallel x "
    "--expert-groups ranks each; one rank each without them)."
)
EXPERT_GROUPS_HELP = (
    "Under torchrun: 2 puts the high-noise expert on one group of ranks and the low-noise "
    "expert on another, and pipelines the --prompts lines through them; with --ulysses or "
    "--cfg-parallel each group has several ranks."
)


def _settings(
    *,
    prompt: str = "",
    negative_prompt: str | None = None,
    width: int | None = None,
    height: int | None = None,
    frames: int | None = None,
    steps: str | None = None,
    shift: float | None = None,
    sampler: str | None = None,
    guidance: list[str] | None = None,
    boundary: str | None = None,
    band: float | None = None,
    sigmas: tuple[float, ...] | None = None,
    seed: int = 0,
    image: Path | None = None,
    recipe: str | None = None,
    step_cache: str | None = None,
):
    """GenerateSettings from CLI values (validated later, once, by resolve_settings)."""
    from vidmoe.sampling.settings import GenerateSettings

    num_steps, steps_per_expert = parse_steps(steps)
    s = GenerateSettings(
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        num_frames=frames,
        num_steps=num_steps,
        shift=shift,
        sampler=sampler,
        guidance=parse_per_expert(guidance),
        boundary=boundary,
        band=band,
        steps_per_expert=steps_per_expert,
        sigmas=sigmas,
        seed=seed,
        image=str(image) if image else None,
        step_cache=parse_step_cache(step_cache),
    )
    if recipe:
        from vidmoe.sampling.recipes import apply_recipe

        s = apply_recipe(s, recipe)
    return s


def _fail(e: BaseException) -> None:
    message = " ".join(str(e).split()) or type(e).__name__
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn a user or environment error (ValueError, OSError) into `error: ...` and exit 2."""
    try:
        yield
    except (ValueError, OSError) as e:
        if os.environ.get("VIDMOE_DEBUG"):
            raise
        _fail(e)


def _plan(
    settings,
    model: str | None,
    *,
    any_image: bool = False,
    files: dict | None = None,
    full: bool = False,
):
    """Validate `settings` against the model's config and plan the steps (no weights loaded);
    `any_image` stands in an image for an i2v model when only the plan is wanted; `files` are
    components from separate files (`_component_files`); `full` also returns the resolved
    settings and the model config."""
    from vidmoe.loading import model_config_for, model_config_for_files
    from vidmoe.sampling.plan import plan_for
    from vidmoe.sampling.settings import resolve_settings

    if files:
        config = model_config_for_files(model, experts=files["experts"], vae=files["vae"])
    else:
        config = model_config_for(model)
    image_size = None
    if any_image and config.transformer.model_type == "i2v" and not settings.image:
        settings = type(settings)(**{**settings.__dict__, "image": "<image>"})
        image_size = config.default_size  # an image of the default size keeps that size
    rs = resolve_settings(settings, config, image_size=image_size)
    return (plan_for(rs, config), rs, config) if full else plan_for(rs, config)


def _load(
    model: str | None,
    *,
    device: str,
    dtype: str,
    residency: str,
    loras: list,
    lora_strict: str,
    fuse_lora: bool,
    quiet: bool,
    quantize: str | None = None,
    files: dict | None = None,
    attention: str = "auto",
    compile: bool = False,
    shard=None,
):
    """The pipeline with its LoRAs; a model that cannot be built is a user error."""
    from vidmoe.loading import load_pipeline

    try:
        pipe = load_pipeline(
            model,
            device=device,
            dtype=dtype,
            residency=residency,
            quantize=quantize,
            attention=attention,
            compile=compile,
            **(files or {}),
            **({"shard": shard} if shard is not None else {}),
        )
    except (RuntimeError, MemoryError) as e:  # e.g. a config whose sizes cannot be allocated
        raise ValueError(f"cannot build the model {model or '(demo)'}: {e}") from e
    for expert, path, strength in loras:
        rec = pipe.load_lora(path, expert=expert, strength=strength, strict=lora_strict == "on")
        if not quiet:
            on = ", ".join(f"{e}={v:g}" for e, v in rec.strengths.items())
            typer.echo(f"lora {rec.name}: {rec.format} format, {rec.num_modules} modules ({on})")
    if fuse_lora and loras:
        pipe.fuse_lora()
    return pipe


def _run(pipe, settings, *, quiet: bool, output: str = "frames"):
    import torch

    try:
        return pipe.generate(settings, progress=not quiet, output=output)
    except (torch.OutOfMemoryError, MemoryError) as e:
        raise ValueError(
            f"out of memory while generating ({e}): try a smaller size, fewer frames or --residency swap"
        ) from e


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


def _check_heads(config, ulysses: int) -> None:
    """Every expert's heads must split over the Ulysses ranks (before anything loads)."""
    from vidmoe.parallel.ulysses import check_heads

    for name in config.moe.expert_names:
        check_heads(config.transformer_for(name).num_heads, ulysses)


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
        _check_heads(config, ulysses)
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
        result = _run(pipe, s, quiet=quiet, output="frames" if run.world.is_main else "latents")
        if run.world.is_main:
            _publish(result, pipe, output, recipe=recipe)
    if not run.world.is_main:
        return
    t, h, w, _ = result.frames.shape
    typer.echo(
        f"wrote {output} ({t} frames, {w}x{h}, {pipe.config.fps} fps) in {sum(result.timings.values()):.1f}s"
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


def _memory(
    config,
    rs,
    *,
    device: str,
    dtype: str,
    residency: str,
    quantize: str | None,
    budget: str | None,
    runnable: bool = False,
):
    """The predicted MemoryPlan of a run; with a budget, of the fastest policy that fits it
    (`runnable`: only among the policies this build runs)."""
    from vidmoe.devices import resolve_device, resolve_dtype
    from vidmoe.models.moe import RESIDENCY
    from vidmoe.planner import POLICIES, MemoryRequest, choose_policy, parse_budget, predict

    if quantize not in (None, "fp8", "auto"):
        raise ValueError(f"--quantize must be fp8 or auto; got {quantize!r}")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    request = MemoryRequest(
        width=rs.width,
        height=rs.height,
        num_frames=rs.num_frames,
        dtype=str(torch_dtype).removeprefix("torch."),
        residency=residency,
        quantize="fp8" if quantize == "fp8" else None,
        device=dev.type,
    )
    if budget is None:
        return predict(config, request)
    policies = tuple(p for p in POLICIES if p in RESIDENCY) if runnable else POLICIES
    return choose_policy(
        config,
        request,
        parse_budget(budget),
        allow_fp8=quantize == "auto",
        policies=policies,
        fp8_hint="--quantize auto",
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


@app.command()
def train(
    config: Path = typer.Argument(
        ..., help="Training config (TOML or JSON); see docs/training.md."
    ),
):
    """Train a Mixture-of-Experts video model from a latent cache; resumes from its out_dir.

    Under `torchrun --nproc-per-node N -m vidmoe train CONFIG` every process trains its share of
    each batch ([distributed] in the config: DDP or FSDP2); rank 0 writes the files."""
    from vidmoe.parallel.world import device_for, start, stop, world_from_env
    from vidmoe.training.loop import load_train_config, train_main

    with _user_errors():
        world = world_from_env(os.environ)
        if world.distributed:
            start(world, device_for(world, load_train_config(config).device))
        try:
            out = train_main(config, world=world)
        finally:
            stop()
    if world.is_main:
        typer.echo(f"training state in {out}")


@app.command("train-vae")
def train_vae_command(
    config: Path = typer.Argument(
        ..., help="VAE training config (TOML or JSON); see docs/training.md."
    ),
):
    """Train or fine-tune a small causal VAE on the shapes world (a decoder-only stage keeps the
    latent space, so latent caches and trained experts stay valid)."""
    from vidmoe.training.vae_train import train_vae_main

    with _user_errors():
        out = train_vae_main(config, log=typer.echo)
    typer.echo(f"VAE in {out}")


@app.command("eval")
def eval_(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
    num_prompts: int = typer.Option(
        32, "--prompts", help="Held-out prompts per set (balanced over colour, shape, motion)."
    ),
    seeds: str = typer.Option(
        "0", "--seeds", help="Seeds, each prompt at each: a list and/or ranges, e.g. 2,3 or 0-3."
    ),
    motions: str = typer.Option(
        "left,right,up,down", "--motions", help="Motions in the prompt set."
    ),
    prompt_set: str = typer.Option(
        "phrasings",
        "--prompt-set",
        help="Held-out prompts: phrasings (templates and motion phrases no caption uses), words "
        "(colour, shape and motion words no caption uses) or both.",
    ),
    expert: list[str] | None = typer.Option(
        None,
        "--expert",
        help="NAME=FILE: that expert's weights from FILE, the others the model's (repeatable), "
        "e.g. low_noise=runs/low/low_noise.safetensors.",
    ),
    ablation: list[str] | None = typer.Option(
        None, "--ablation", help="swap, boundary:0.5,0.9 or band:0.05 (repeatable)."
    ),
    steps: str | None = typer.Option(
        None, "--steps", "-s", help="Steps, or per expert: high_noise=2,low_noise=6."
    ),
    shift: float | None = typer.Option(None, "--shift"),
    sampler: str | None = typer.Option(None, "--sampler", help="euler, unipc or dpm++."),
    guidance: list[str] | None = typer.Option(
        None, "--guidance", "-g", help="Per expert: high_noise=4.0,low_noise=3.0."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Report path (writes .md, .json and .png)."
    ),
):
    """Prompt adherence (analyser read-back) on held-out phrasings and words, the first frame's
    change against later frames, flicker and speed, with inference-time ablations."""
    from vidmoe.eval_report import dumps, markdown_details, markdown_table
    from vidmoe.evaluation import parse_expert_files, parse_seeds, run_eval

    command = "vidmoe eval " + " ".join(sys.argv[2:])
    with _user_errors():
        num_steps, steps_per_expert = parse_steps(steps)
        settings = dict(
            num_steps=num_steps,
            shift=shift,
            sampler=sampler,
            guidance=parse_per_expert(guidance),
            steps_per_expert=steps_per_expert,
        )
        results = run_eval(
            model,
            num_prompts=num_prompts,
            seeds=parse_seeds(seeds),
            ablations=ablation or [],
            motions=tuple(m.strip() for m in motions.split(",")),
            out=out,
            command=command,
            prompts=prompt_set,
            experts=parse_expert_files(expert or []),
            **settings,
        )
    typer.echo(markdown_table(results))
    typer.echo(markdown_details(results))
    if out is None:
        typer.echo(dumps(results))


@app.command()
def cache(
    out: Path = typer.Argument(..., help="Folder of the new latent cache."),
    videos: Path | None = typer.Option(
        None,
        "--videos",
        help="Folder of mp4s + metadata.jsonl/csv; default: the demo's shapes world.",
    ),
    clips: int = typer.Option(
        0, "--clips", help="Clips to encode (0: every video; the world needs a number)."
    ),
    start: int = typer.Option(0, "--start", help="First clip: world index or metadata row."),
    captions: int = typer.Option(
        1, "--captions", help="Phrasings per world clip (one drawn per sample)."
    ),
    vocabulary: str = typer.Option(
        "base", "--vocabulary", help="World captions' vocabulary: base, extended or rich."
    ),
    frames: int = typer.Option(
        0, "--frames", "-f", help="Frames per video (0: the model's default)."
    ),
    width: int = typer.Option(0, "--width", "-W", help="Video width (0: the model's default)."),
    height: int = typer.Option(0, "--height", "-H", help="Video height (0: the model's default)."),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Model folder whose VAE and text encoder encode. Default: the shipped demo model.",
    ),
    vae: Path | None = typer.Option(
        None,
        "--vae",
        help="VAE folder (vae.safetensors + vae_config.json, as train-vae writes) in place of the model's.",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(16, "--batch-size", help="Clips encoded at once."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Build a latent + text-embedding cache (what `vidmoe train` reads) from videos or the shapes world."""
    from vidmoe.training.cache import CacheSource, build_cache

    with _user_errors():
        source = CacheSource(
            videos=videos,
            start=start,
            clips=clips,
            captions=captions,
            vocabulary=vocabulary,
            num_frames=frames,
            width=width,
            height=height,
        )
        index = build_cache(
            out,
            source,
            model=model,
            vae=vae,
            device=device,
            batch_size=batch_size,
            progress=not quiet,
        )
    typer.echo(f"latent cache in {index.parent}")


@app.command()
def export(
    out: Path = typer.Argument(..., help="The model folder to write."),
    runs: list[Path] = typer.Argument(
        ..., help="Training runs (out_dir folders) that together hold every expert."
    ),
    config: Path = typer.Option(
        ..., "--config", help="Model config (a vidmoe.json; its vae table may be left out)."
    ),
    vae: Path = typer.Option(
        ..., "--vae", help="VAE folder (train-vae's out_dir, or a model folder)."
    ),
):
    """Write training runs' EMA experts, a VAE and a model config as a model folder."""
    from vidmoe.training.export import export_runs

    with _user_errors():
        export_runs(out, runs, config=config, vae=vae)
    typer.echo(f"model in {out}")


@app.command()
def convert(
    src: Path = typer.Argument(
        ..., help="A checkpoint folder or file in any layout vidmoe reads (or a .gguf expert)."
    ),
    dst: Path = typer.Argument(
        ...,
        help="Where to write: a folder (a .safetensors or .gguf file for a one-expert source).",
    ),
    layout: str = typer.Option(
        ..., "--layout", help="official, diffusers, comfyui, vidmoe or gguf."
    ),
    quantize: str | None = typer.Option(
        None,
        "--quantize",
        help="fp8: block linear weights as ComfyUI fp8_scaled (a scale per output channel); "
        "with --layout gguf a GGUF type: q8_0, q5_1, q5_0, q4_1, q4_0, f16, bf16, f32.",
    ),
):
    """Write a checkpoint in another layout: experts, VAE, umT5 text encoder and tokenizer."""
    from vidmoe.io.convert import check_quantize
    from vidmoe.io.convert import convert as convert_checkpoint

    with _user_errors():
        check_quantize(layout, quantize)
        if dst.exists() and any(dst.iterdir() if dst.is_dir() else [dst]):
            raise ValueError(f"{dst} exists: give a new DST (convert does not overwrite)")
        out = convert_checkpoint(src, dst, layout=layout, quantize=quantize)
    typer.echo(f"wrote {out.path} ({layout} layout{f', {quantize}' if quantize else ''})")
    for component, path in out.files.items():
        typer.echo(f"  {component}: {path}")
    for note in out.notes:
        typer.echo(f"  note: {note}")


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
