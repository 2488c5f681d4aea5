"""The `vidmoe` command line: parse options -> settings -> call the library. No math here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Mixture-of-Experts video diffusion (Wan2.2 style).")

MODEL_HELP = "Checkpoint folder or file (official, diffusers, ComfyUI or vidmoe layout), or a preset name. Default: the shipped demo model."


def parse_per_expert(values: list[str] | None, kind=float, what: str = "guidance") -> dict:
    """'high_noise=4,low_noise=3' or repeated 'name=value' -> {name: value}."""
    out = {}
    for item in values or []:
        for part in item.split(","):
            if "=" not in part:
                raise typer.BadParameter(f"{what} must be NAME=VALUE (e.g. high_noise=4.0); got {part!r}")
            name, value = part.split("=", 1)
            try:
                out[name.strip()] = kind(value)
            except ValueError:
                raise typer.BadParameter(f"{what} for {name!r} must be a number; got {value!r}") from None
    return out


def _settings(prompt, negative_prompt, width, height, frames, steps, shift, sampler, guidance, boundary, seed, image,
              sigmas=None):  # fmt: skip
    from vidmoe.sampling.settings import GenerateSettings

    steps_per_expert = {}
    num_steps = None
    if steps is not None:
        if "=" in steps:
            steps_per_expert = parse_per_expert([steps], int, "steps")
        else:
            try:
                num_steps = int(steps)
            except ValueError:
                raise typer.BadParameter(f"steps must be an integer or NAME=N,...; got {steps!r}") from None
    sigma_list = None
    if sigmas:
        values = [float(v) for v in sigmas.split(",")]
        sigma_list = tuple(v / 1000 if max(values) > 1 else v for v in values)
    return GenerateSettings(
        prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, num_frames=frames,
        num_steps=num_steps, shift=shift, sampler=sampler, guidance=parse_per_expert(guidance),
        boundary=boundary, steps_per_expert=steps_per_expert, sigmas=sigma_list, seed=seed, image=image,
    )  # fmt: skip


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def generate(
    prompt: str = typer.Argument("", help="The prompt (empty: an unconditional sample)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", "-n", help="Default: the model's."),
    width: Optional[int] = typer.Option(None, "--width", "-W"),
    height: Optional[int] = typer.Option(None, "--height", "-H"),
    frames: Optional[int] = typer.Option(None, "--frames", "-f", help="Frame count, 4k+1."),
    steps: Optional[str] = typer.Option(None, "--steps", "-s", help="Steps, or per expert: high_noise=2,low_noise=6."),
    shift: Optional[float] = typer.Option(None, "--shift"),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="euler, unipc or dpm++."),
    guidance: Optional[list[str]] = typer.Option(None, "--guidance", "-g", help="Per expert: high_noise=4.0,low_noise=3.0."),
    boundary: Optional[str] = typer.Option(None, "--boundary", help="A sigma in (0,1), or release, snr, steps:N."),
    timesteps: Optional[str] = typer.Option(None, "--timesteps", help="Explicit list: 1000,750,500,250 (or sigmas)."),
    seed: int = typer.Option(0, "--seed"),
    image: Optional[Path] = typer.Option(None, "--image", "-i", help="First frame (i2v, ti2v)."),
    output: Path = typer.Option(Path("outputs/video.mp4"), "--output", "-o"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:1 or auto."),
    dtype: str = typer.Option("auto", "--dtype", help="float32, bfloat16, float16 or auto."),
    residency: str = typer.Option("resident", "--residency", help="resident or swap (idle expert in host RAM)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Generate a video; writes OUTPUT (mp4) and OUTPUT.json (settings, plan, trace)."""
    from vidmoe.io.video import write_json, write_mp4
    from vidmoe.loading import load_pipeline, model_config_for

    try:
        s = _settings(prompt, negative_prompt, width, height, frames, steps, shift, sampler, guidance, boundary,
                      seed, str(image) if image else None, timesteps)  # fmt: skip
        from vidmoe.sampling.pipeline import build_plan_for
        from vidmoe.sampling.settings import resolve_settings

        config = model_config_for(model)
        rs = resolve_settings(s, config)  # validate before any heavy work
        plan = build_plan_for(rs, config)
        if not quiet:
            typer.echo(plan.summary())
        pipe = load_pipeline(model, device=device, dtype=dtype, residency=residency)
        result = pipe.generate(s, progress=not quiet)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    write_mp4(result.frames, output, fps=pipe.config.fps)
    record = {"settings": result.settings.to_dict(), "model": pipe.source, "plan": result.plan.to_dict(),
              "trace": result.trace, "timings": result.timings}  # fmt: skip
    write_json(record, output.with_suffix(output.suffix + ".json"))
    t, h, w, _ = result.frames.shape
    typer.echo(f"wrote {output} ({t} frames, {w}x{h}, {pipe.config.fps} fps) in {sum(result.timings.values()):.1f}s")


@app.command()
def info(model: Optional[str] = typer.Argument(None, help=MODEL_HELP)):
    """Print the experts, parameters (total and active per step), boundary and default plan."""
    from vidmoe.loading import describe_model

    try:
        typer.echo(describe_model(model))
    except (ValueError, FileNotFoundError) as e:
        _fail(e)


@app.command()
def plan(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    steps: Optional[str] = typer.Option(None, "--steps", "-s"),
    shift: Optional[float] = typer.Option(None, "--shift"),
    guidance: Optional[list[str]] = typer.Option(None, "--guidance", "-g"),
    boundary: Optional[str] = typer.Option(None, "--boundary"),
    timesteps: Optional[str] = typer.Option(None, "--timesteps"),
):
    """Print the per-step plan: boundary, steps per expert, guidance per step."""
    from vidmoe.loading import model_config_for
    from vidmoe.sampling.pipeline import build_plan_for
    from vidmoe.sampling.settings import resolve_settings

    try:
        config = model_config_for(model)
        s = _settings("", None, None, None, None, steps, shift, None, guidance, boundary, 0, None, timesteps)
        if config.transformer.model_type == "i2v":
            s = type(s)(**{**s.__dict__, "image": "<image>"})
        typer.echo(build_plan_for(resolve_settings(s, config), config).summary())
    except ValueError as e:
        _fail(e)


def main() -> None:
    if os.environ.get("VIDMOE_DEBUG"):
        app()
    else:
        try:
            app()
        except KeyboardInterrupt:
            sys.exit(130)
