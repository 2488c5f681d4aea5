"""The `vidmoe` command line: parse options -> settings -> call the library. No math here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Mixture-of-Experts video diffusion (Wan2.2 style).",
)

MODEL_HELP = "Checkpoint folder or file (official, diffusers, ComfyUI or vidmoe layout), or a preset name. Default: the shipped demo model."


def parse_per_expert(values: list[str] | None, kind=float, what: str = "guidance") -> dict:
    """'high_noise=4,low_noise=3' or repeated 'name=value' -> {name: value}."""
    out = {}
    for item in values or []:
        for part in item.split(","):
            if "=" not in part:
                raise typer.BadParameter(
                    f"{what} must be NAME=VALUE (e.g. high_noise=4.0); got {part!r}"
                )
            name, value = part.split("=", 1)
            try:
                out[name.strip()] = kind(value)
            except ValueError:
                raise typer.BadParameter(
                    f"{what} for {name!r} must be a number; got {value!r}"
                ) from None
    return out


def _settings(prompt, negative_prompt, width, height, frames, steps, shift, sampler, guidance, boundary, seed, image,
              sigmas=None, band=None):  # fmt: skip
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
                raise typer.BadParameter(
                    f"steps must be an integer or NAME=N,...; got {steps!r}"
                ) from None
    sigma_list = None
    if sigmas:
        values = [float(v) for v in sigmas.split(",")]
        sigma_list = tuple(v / 1000 if max(values) > 1 else v for v in values)
    return GenerateSettings(
        prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, num_frames=frames,
        num_steps=num_steps, shift=shift, sampler=sampler, guidance=parse_per_expert(guidance),
        boundary=boundary, band=band, steps_per_expert=steps_per_expert, sigmas=sigma_list, seed=seed,
        image=image,
    )  # fmt: skip


def parse_lora_spec(item: str) -> tuple[str | None, str, float]:
    """'high_noise=FILE:0.8', 'FILE:0.5' or 'FILE' -> (expert or None, file, strength)."""
    expert, rest = None, item
    head, sep, tail = item.partition("=")
    if sep and head.isidentifier():
        expert, rest = head, tail
    path, strength = rest, 1.0
    if ":" in rest and not Path(rest).exists():
        path, value = rest.rsplit(":", 1)
        try:
            strength = float(value)
        except ValueError:
            raise typer.BadParameter(
                f"LoRA strength must be a number; got {value!r} in {item!r}"
            ) from None
    return expert, path, strength


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


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
    band: float | None = typer.Option(
        None, "--band", help="Transition band half-width (sigma) around each boundary; 0 switches hard."
    ),
    timesteps: str | None = typer.Option(
        None, "--timesteps", help="Explicit list: 1000,750,500,250 (or sigmas)."
    ),
    seed: int = typer.Option(0, "--seed"),
    image: Path | None = typer.Option(None, "--image", "-i", help="First frame (i2v, ti2v)."),
    output: Path = typer.Option(Path("outputs/video.mp4"), "--output", "-o"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:1 or auto."),
    dtype: str = typer.Option("auto", "--dtype", help="float32, bfloat16, float16 or auto."),
    residency: str = typer.Option(
        "resident", "--residency", help="resident or swap (idle expert in host RAM)."
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
    recipe: str | None = typer.Option(
        None, "--recipe", help="Few-step recipe, e.g. lightning-4step."
    ),
):
    """Generate a video; writes OUTPUT (mp4) and OUTPUT.json (settings, plan, trace)."""
    from vidmoe.io.video import write_json, write_mp4
    from vidmoe.loading import load_pipeline, model_config_for

    try:
        s = _settings(prompt, negative_prompt, width, height, frames, steps, shift, sampler, guidance, boundary,
                      seed, str(image) if image else None, timesteps, band)  # fmt: skip
        if recipe:
            from vidmoe.sampling.recipes import apply_recipe

            s = apply_recipe(s, recipe)
        if lora_strict not in ("on", "off"):
            raise ValueError(f"--lora-strict must be on or off; got {lora_strict!r}")
        lora_specs = [parse_lora_spec(item) for item in lora or []]
        from vidmoe.sampling.pipeline import build_plan_for
        from vidmoe.sampling.settings import resolve_settings

        config = model_config_for(model)
        rs = resolve_settings(s, config)  # validate before any heavy work
        plan = build_plan_for(rs, config)
        if not quiet:
            typer.echo(plan.summary())
        pipe = load_pipeline(model, device=device, dtype=dtype, residency=residency)
        for expert, path, strength in lora_specs:
            rec = pipe.load_lora(path, expert=expert, strength=strength, strict=lora_strict == "on")
            if not quiet:
                on = ", ".join(f"{e}={v:g}" for e, v in rec.strengths.items())
                typer.echo(
                    f"lora {rec.name}: {rec.format} format, {rec.num_modules} modules ({on})"
                )
        if fuse_lora and lora_specs:
            pipe.fuse_lora()
        result = pipe.generate(s, progress=not quiet)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    write_mp4(result.frames, output, fps=pipe.config.fps)
    record = {"settings": result.settings.to_dict(), "model": pipe.source, "plan": result.plan.to_dict(),
              "trace": result.trace, "timings": result.timings}  # fmt: skip
    if recipe:
        record["recipe"] = recipe
    write_json(record, output.with_suffix(output.suffix + ".json"))
    t, h, w, _ = result.frames.shape
    typer.echo(
        f"wrote {output} ({t} frames, {w}x{h}, {pipe.config.fps} fps) in {sum(result.timings.values()):.1f}s"
    )


@app.command()
def info(model: str | None = typer.Argument(None, help=MODEL_HELP)):
    """Print the experts, parameters (total and active per step), boundary and default plan."""
    from vidmoe.loading import describe_model

    try:
        typer.echo(describe_model(model))
    except (ValueError, FileNotFoundError) as e:
        _fail(e)


@app.command()
def plan(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
    steps: str | None = typer.Option(None, "--steps", "-s"),
    shift: float | None = typer.Option(None, "--shift"),
    guidance: list[str] | None = typer.Option(None, "--guidance", "-g"),
    boundary: str | None = typer.Option(None, "--boundary"),
    band: float | None = typer.Option(
        None, "--band", help="Transition band half-width (sigma) around each boundary; 0 switches hard."
    ),
    timesteps: str | None = typer.Option(None, "--timesteps"),
    recipe: str | None = typer.Option(
        None, "--recipe", help="Few-step recipe, e.g. lightning-4step."
    ),
):
    """Print the per-step plan: boundary, steps per expert, guidance per step."""
    from vidmoe.loading import model_config_for
    from vidmoe.sampling.pipeline import build_plan_for
    from vidmoe.sampling.settings import resolve_settings

    try:
        config = model_config_for(model)
        s = _settings(
            "", None, None, None, None, steps, shift, None, guidance, boundary, 0, None, timesteps, band
        )
        if recipe:
            from vidmoe.sampling.recipes import apply_recipe

            s = apply_recipe(s, recipe)
        if config.transformer.model_type == "i2v":
            s = type(s)(**{**s.__dict__, "image": "<image>"})
        typer.echo(build_plan_for(resolve_settings(s, config), config).summary())
    except ValueError as e:
        _fail(e)


@app.command()
def serve(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; other than loopback needs --token."),
    port: int = typer.Option(7860, "--port"),
    outputs: Path = typer.Option(Path("outputs/serve"), "--outputs", help="Job database, videos and uploads."),
    max_queue: int = typer.Option(64, "--max-queue", help="Jobs waiting at most; more get HTTP 429."),
    token: str | None = typer.Option(None, "--token", help="Bearer token for /v1 (default: $VIDMOE_TOKEN)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:1 or auto."),
    dtype: str = typer.Option("auto", "--dtype", help="float32, bfloat16, float16 or auto."),
    residency: str = typer.Option("resident", "--residency", help="resident or swap (idle expert in host RAM)."),
    log_level: str = typer.Option("info", "--log-level"),
):
    """Serve the HTTP job API (/v1) and the web UI (/) with a persistent job queue."""
    import ipaddress

    token = token or os.environ.get("VIDMOE_TOKEN") or None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not token:
        _fail(ValueError(f"binding {host} exposes the server beyond this machine: give --token (or set VIDMOE_TOKEN)"))
    try:
        import uvicorn

        from vidmoe.serve.app import ServeConfig, create_app
    except ImportError as e:
        _fail(ValueError(f"vidmoe serve needs the serve extra ({e.name} is missing): pip install 'vidmoe[serve]'"))
    try:
        cfg = ServeConfig(model=model, outputs=outputs, max_queue=max_queue, token=token, device=device,
                          dtype=dtype, residency=residency)  # fmt: skip
        application = create_app(cfg)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(f"vidmoe serve: {application.state.config.name} on http://{host}:{port}/ (outputs {outputs})")
    uvicorn.run(application, host=host, port=port, log_level=log_level)


@app.command()
def train(config: Path = typer.Argument(..., help="Training config (TOML or JSON); see docs/training.md.")):
    """Train a Mixture-of-Experts video model from a latent cache; resumes from its out_dir."""
    from vidmoe.training.loop import train_main

    try:
        out = train_main(config)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(f"training state in {out}")


@app.command("train-vae")
def train_vae_command(
    config: Path = typer.Argument(..., help="VAE training config (TOML or JSON); see docs/training.md."),
):
    """Train or fine-tune a small causal VAE on the shapes world (a decoder-only stage keeps the
    latent space, so latent caches and trained experts stay valid)."""
    from vidmoe.training.vae_train import train_vae_main

    try:
        out = train_vae_main(config, log=typer.echo)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(f"VAE in {out}")


@app.command("eval")
def eval_(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
    num_prompts: int = typer.Option(32, "--prompts", help="Held-out prompts (balanced over colour, shape, motion)."),
    seeds: int = typer.Option(1, "--seeds", help="Seeds per prompt."),
    motions: str = typer.Option("left,right,up,down", "--motions", help="Motions in the prompt set."),
    ablation: list[str] | None = typer.Option(None, "--ablation", help="swap, boundary:0.5,0.9 or band:0.05 (repeatable)."),
    steps: int | None = typer.Option(None, "--steps", "-s"),
    out: Path | None = typer.Option(None, "--out", "-o", help="Report path (writes .md, .json and .png)."),
):
    """Prompt adherence (analyser read-back), flicker and speed, with inference-time ablations."""
    from vidmoe.evaluation import dumps, markdown_table, run_eval

    command = "vidmoe eval " + " ".join(sys.argv[2:])
    try:
        results = run_eval(model, num_prompts=num_prompts, seeds=tuple(range(seeds)), ablations=ablation or [],
                           motions=tuple(motions.split(",")), out=out, command=command, num_steps=steps)  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(markdown_table(results))
    if out is None:
        typer.echo(dumps(results))


@app.command()
def cache(
    out: Path = typer.Argument(..., help="Folder of the new latent cache."),
    videos: Path | None = typer.Option(None, "--videos", help="Folder of mp4s + metadata.jsonl/csv; default: the demo's shapes world."),
    clips: int = typer.Option(0, "--clips", help="Clips to encode (0: every video; the world needs a number)."),
    start: int = typer.Option(0, "--start", help="First clip: world index or metadata row."),
    captions: int = typer.Option(1, "--captions", help="Phrasings per world clip (one drawn per sample)."),
    vocabulary: str = typer.Option("base", "--vocabulary", help="World captions' motion phrasings: base or extended."),
    frames: int = typer.Option(0, "--frames", "-f", help="Frames per video (0: the model's default)."),
    width: int = typer.Option(0, "--width", "-W", help="Video width (0: the model's default)."),
    height: int = typer.Option(0, "--height", "-H", help="Video height (0: the model's default)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Model folder whose VAE and text encoder encode. Default: the shipped demo model."),
    vae: Path | None = typer.Option(None, "--vae", help="VAE folder (vae.safetensors + vae_config.json, as train-vae writes) in place of the model's."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(16, "--batch-size", help="Clips encoded at once."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Build a latent + text-embedding cache (what `vidmoe train` reads) from videos or the shapes world."""
    from vidmoe.training.cache import CacheSource, build_cache

    try:
        source = CacheSource(videos=videos, start=start, clips=clips, captions=captions, vocabulary=vocabulary,
                             num_frames=frames, width=width, height=height)  # fmt: skip
        index = build_cache(out, source, model=model, vae=vae, device=device, batch_size=batch_size,
                            progress=not quiet)  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(f"latent cache in {index.parent}")


@app.command()
def export(
    out: Path = typer.Argument(..., help="The model folder to write."),
    runs: list[Path] = typer.Argument(..., help="Training runs (out_dir folders) that together hold every expert."),
    config: Path = typer.Option(..., "--config", help="Model config (a vidmoe.json; its vae table may be left out)."),
    vae: Path = typer.Option(..., "--vae", help="VAE folder (train-vae's out_dir, or a model folder)."),
):
    """Write training runs' EMA experts, a VAE and a model config as a model folder."""
    from vidmoe.training.export import export_runs

    try:
        export_runs(out, runs, config=config, vae=vae)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(f"model in {out}")


def main() -> None:
    if os.environ.get("VIDMOE_DEBUG"):
        app()
    else:
        try:
            app()
        except KeyboardInterrupt:
            sys.exit(130)


if __name__ == "__main__":
    main()
