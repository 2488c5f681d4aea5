"""What every `vidmoe` verb shares: the typer app, the option help texts, the settings from
the options, one-line user errors, and loading the model with the options' choices."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import typer

from vidmoe.cli_args import (
    parse_per_expert,
    parse_step_cache,
    parse_steps,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Mixture-of-Experts video diffusion (Wan2.2 style).",
)

MODEL_HELP = "Checkpoint folder or file (official, diffusers, ComfyUI or vidmoe layout), or a preset name. Default: the shipped demo model."
REWRITE_HELP = (
    "Rewrite the prompt into the words the model's captions used, with the lexicon its folder "
    "ships (the demo: 'crimson disc' -> 'red circle'); --no-rewrite encodes it as given."
)
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
