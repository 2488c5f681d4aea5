"""The verbs that make and measure models: `train`, `train-vae`, `eval`, `cache`, `export` and
`convert`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from vidmoe.cli_args import (
    parse_per_expert,
    parse_steps,
)
from vidmoe.cli_common import (
    MODEL_HELP,
    REWRITE_HELP,
    _user_errors,
    app,
)


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
        "(colour, shape and motion words no caption uses), fresh (more such words, kept apart "
        "from the lexicon's making), both (phrasings and words) or all.",
    ),
    rewrite: bool = typer.Option(True, "--rewrite/--no-rewrite", help=REWRITE_HELP),
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
            rewrite_prompt=rewrite,
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
    experts_from: Path | None = typer.Option(
        None,
        "--experts-from",
        help="Model folder giving the experts no run trained (a one-expert fine-tune).",
    ),
):
    """Write training runs' EMA experts, a VAE and a model config as a model folder."""
    from vidmoe.training.export import export_runs

    with _user_errors():
        export_runs(out, runs, config=config, vae=vae, experts_from=experts_from)
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
