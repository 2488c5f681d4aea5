"""Training and inference ablations of the Mixture of Experts on the shapes world (CPU, small).

One command runs one named ablation: it trains the runs the ablation needs that are not trained
yet (one at a time, from the demo's latent cache), exports each run as a vidmoe folder, measures
held-out denoising loss per sigma and prompt adherence, and writes the ablation's table into its
marked section of a Markdown file (the text around the markers is kept).

    python benchmarks/ablations.py compute   --write docs/evidence.md   # MoE vs dense N vs dense 2N
    python benchmarks/ablations.py experts   --write docs/evidence.md   # two vs three experts
    python benchmarks/ablations.py inference --write docs/evidence.md   # swap, boundary, band
    python benchmarks/ablations.py terms     --write docs/evidence.md   # optional objective terms
    python benchmarks/ablations.py asymmetric --write docs/evidence.md  # experts of unequal shape

Runs live under --root (default /work/runs/ablations): <run>/checkpoint.pt, log.jsonl, and
model_<vae>/ (the run exported with the VAE folder given by --vae; default: a copy of the VAE whose
encoder made the cache). `--vae DIR` with another decoder of the same encoder re-evaluates the
same experts into sections named `<ablation>@<DIR name>`; `--seeds 2` evaluates two seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vidmoe.config import ModelConfig, MoEConfig, SchedulerConfig, TransformerConfig, VAEConfig

DEMO = Path("/work/runs/demo")
HIGH, MID, LOW = "high_noise", "mid_noise", "low_noise"
STEPS = 1000  # S: optimiser steps of the MoE and dense-N runs (~6 min each at 1 CPU thread)
GUIDANCE = 5.0  # the same scale for every expert, so dense and MoE sample alike
SAMPLING = SchedulerConfig(sampler="euler", num_steps=20, shift=3.0)
SIGMA_GRID = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)


def expert_config(num_layers: int) -> TransformerConfig:
    """The size-N expert (4 layers) or a deeper dense model, at the demo's interface."""
    return TransformerConfig(
        model_type="t2v",
        patch_size=(1, 2, 2),
        text_len=32,
        in_dim=16,
        dim=96,
        ffn_dim=384,
        freq_dim=256,
        text_dim=384,
        out_dim=16,
        num_heads=4,
        num_layers=num_layers,
    )


@dataclass(frozen=True)
class Run:
    """One training run of an ablation."""

    name: str
    label: str
    expert_names: tuple[str, ...]
    boundaries: tuple[float, ...]
    num_layers: int
    max_steps: int
    band: float = 0.0
    """MoEConfig.band, in training (band_training) and in the exported model's sampling."""
    objective: tuple[tuple[str, float], ...] = ()
    """TrainConfig fields of the optional objective terms (vidmoe.training.objective_terms)."""
    overrides: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()
    """Per-expert architecture changes (`expert_overrides` of the run and its exported model)."""


RUNS = {
    r.name: r
    for r in [
        Run("moe2", "MoE, 2 experts x N", (HIGH, LOW), (0.875,), 4, STEPS),
        Run("dense", "dense N", ("dense",), (), 4, STEPS),
        Run("dense2x_half", "dense 2N, S/2 steps (equal compute)", ("dense",), (), 8, STEPS // 2),
        Run("dense2x", "dense 2N, S steps (equal steps)", ("dense",), (), 8, STEPS),
        Run("moe3", "MoE, 3 experts x N", (HIGH, MID, LOW), (0.93, 0.75), 4, STEPS),
        # the optional objective terms, each against moe2 (same data, steps and seed)
        Run(
            "moe2_band",
            "MoE 2 x N, band training (band 0.05)",
            (HIGH, LOW),
            (0.875,),
            4,
            STEPS,
            band=0.05,
            objective=(("band_training", True),),
        ),
        Run(
            "moe2_temporal",
            "MoE 2 x N, temporal term (weight 1)",
            (HIGH, LOW),
            (0.875,),
            4,
            STEPS,
            objective=(("temporal_weight", 1.0),),
        ),
        Run(
            "moe2_spec",
            "MoE 2 x N, specialisation (weight 0.5, margin 0.05)",
            (HIGH, LOW),
            (0.875,),
            4,
            STEPS,
            objective=(("specialisation_weight", 0.5), ("specialisation_margin", 0.05)),
        ),
        # asymmetric experts, against moe2: a local attention window for the low-noise expert
        # (+-16 tokens = +-1 latent frame of 4x4 tokens), or FFN width moved from the low-noise to the
        # high-noise expert (384 + 384 -> 576 + 192: the same total parameters, 1.5x / 0.5x)
        Run(
            "moe_window",
            "MoE 2 x N, low-noise window +-16 tokens",
            (HIGH, LOW),
            (0.875,),
            4,
            STEPS,
            overrides=((LOW, (("window_size", (16, 16)),)),),
        ),
        Run(
            "moe_wide_high",
            "MoE 2 x N, FFN 576 high / 192 low",
            (HIGH, LOW),
            (0.875,),
            4,
            STEPS,
            overrides=((HIGH, (("ffn_dim", 576),)), (LOW, (("ffn_dim", 192),))),
        ),
    ]
}
ABLATIONS = {
    "compute": ["moe2", "dense", "dense2x_half", "dense2x"],
    "experts": ["moe2", "moe3"],
    "inference": ["moe2"],
    "terms": ["moe2", "moe2_band", "moe2_temporal", "moe2_spec"],
    "asymmetric": ["moe2", "moe_window", "moe_wide_high"],
}


def train_config(run: Run, root: Path, cache: Path):
    from vidmoe.training.config import TrainConfig

    return TrainConfig(
        cache=str(cache),
        out_dir=str(root / run.name),
        transformer=expert_config(run.num_layers),
        moe=MoEConfig(
            expert_names=run.expert_names,
            boundaries=run.boundaries,
            guidance=(GUIDANCE,) * len(run.expert_names),
            band=run.band,
        ),
        **dict(run.objective),
        expert_overrides=run.overrides,
        batch_size=32,
        lr=5e-4,
        warmup_steps=100,
        lr_schedule="constant",
        max_steps=run.max_steps,
        max_minutes=30.0,
        sigma_sampling="uniform",
        sigma_shift=3.0,
        caption_dropout=0.1,
        ema_decay=0.999,
        seed=0,
        log_every=max(1, min(25, run.max_steps // 4)),
        checkpoint_every=250,
        num_threads=1,
        use_progress=False,
    )


def model_config(run: Run, vae_dir: Path) -> ModelConfig:
    vae = VAEConfig(**json.loads((vae_dir / "vae_config.json").read_text()))
    return ModelConfig(
        name=f"ablation-{run.name}",
        transformer=expert_config(run.num_layers),
        vae=vae,
        moe=MoEConfig(
            expert_names=run.expert_names,
            boundaries=run.boundaries,
            guidance=(GUIDANCE,) * len(run.expert_names),
            band=run.band,
        ),
        scheduler=SAMPLING,
        text_encoder="minilm",
        default_size=(64, 64),
        default_num_frames=17,
        fps=8,
        expert_overrides=run.overrides,
    )


def ensure_trained(run: Run, root: Path, cache: Path, vae_dir: Path) -> Path:
    """Train (or resume) `run` to its max_steps; export it with the VAE of `vae_dir`."""
    from safetensors.torch import load_file

    from vidmoe.training.checkpoint import export_model
    from vidmoe.training.loop import train

    out = root / run.name
    done = out / "done.json"
    if not done.is_file():
        t0 = time.time()
        trainer = train(train_config(run, root, cache))
        if trainer.step < run.max_steps:
            raise SystemExit(f"{run.name} stopped at step {trainer.step} (max_minutes)")
        done.write_text(json.dumps({"steps": trainer.step, "seconds": time.time() - t0}))
    model = out / f"model_{vae_dir.name}"
    if not (model / "vidmoe.json").is_file():
        vae = load_file(str(vae_dir / "vae.safetensors"))
        export_model(out / "checkpoint.pt", model_config(run, vae_dir), vae, model)
    return model


def heldout_cache(root: Path, vae_dir: Path) -> Path:
    """64 held-out clips (a world seed the training cache does not use), encoded once."""
    folder = root / "heldout_cache"
    if (folder / "index.json").is_file():
        return folder
    from safetensors.torch import load_file

    from vidmoe.models.text_encoder import build_text_encoder
    from vidmoe.models.vae import WanVAE
    from vidmoe.training.data import build_latent_cache
    from vidmoe.world.shapes import ShapesWorld

    vae = WanVAE(VAEConfig(**json.loads((vae_dir / "vae_config.json").read_text())))
    vae.load_state_dict(load_file(str(vae_dir / "vae.safetensors")))
    vae.eval().requires_grad_(False)
    world = ShapesWorld(64, 64, 17, motions=("left", "right", "up", "down"), seed=12345)
    clips = ({"video": (c := world.sample(i)).video, "caption": c.caption} for i in range(64))
    text = build_text_encoder("minilm", max_length=32)
    build_latent_cache(clips, vae, text, folder, text_len=32, shard_size=64, batch_size=16)
    return folder


@torch.no_grad()
def heldout_losses(pipe, cache, experts=None) -> dict[str, list[float]]:
    """Velocity MSE on the held-out clips at SIGMA_GRID, same noise for every model.

    Key 'routed': the expert the model's hard switch picks at each sigma; plus one key per name
    in `experts` (that expert at every sigma, owned or not).
    """
    from vidmoe.models.moe import Router
    from vidmoe.training.objective import noisy_sample

    router = Router(pipe.config.moe)
    x0, text = cache.latents, cache.text  # (N, Z, F, H, W), (N, S, D)
    out: dict[str, list[float]] = {"routed": []}
    for name in experts or []:
        out[name] = []
    for i, s in enumerate(SIGMA_GRID):
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1000 + i))
        sigma = torch.full((x0.shape[0],), s)  # (N,)
        x, target = noisy_sample(x0, noise, sigma)  # (N, Z, F, H, W) each
        for key in ["routed", *(experts or [])]:
            name = router.owner(s) if key == "routed" else key
            v = pipe.experts[name](x, sigma, text).float()  # (N, Z, F, H, W)
            out[key].append(float((v - target).pow(2).mean()))
    return out


def train_loss(run_dir: Path, last: int = 4) -> dict[str, float]:
    """Count-weighted training loss per expert (and 'all') over the last `last` log lines."""
    records = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines() if x]
    tot: dict[str, list[float]] = {}
    for r in records[-last:]:
        for n, v in r["loss"].items():
            tot.setdefault(n, [0.0, 0.0])
            tot[n][0] += v * r["count"][n]
            tot[n][1] += r["count"][n]
    out = {n: s / c for n, (s, c) in tot.items()}
    out["all"] = sum(s for s, _ in tot.values()) / sum(c for _, c in tot.values())
    return out


def evaluate_run(run: Run, root: Path, vae_dir: Path, num_prompts: int, seeds) -> dict:
    """Held-out loss + adherence of one trained run; cached in <run>/eval.json."""
    from vidmoe.evaluation import evaluate, prompt_set
    from vidmoe.loading import load_pipeline
    from vidmoe.training.data import LatentCache

    path = root / run.name / "eval.json"
    key = f"{num_prompts}x{len(seeds)}@{vae_dir.name}"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if key in cached:
        return cached[key]
    model = root / run.name / f"model_{vae_dir.name}"
    pipe = load_pipeline(model, device="cpu", dtype="float32")
    heldout = heldout_losses(pipe, LatentCache(heldout_cache(root, vae_dir)))
    res = evaluate(pipe, prompt_set(num_prompts), seeds=seeds, name=run.label)
    experts = pipe.experts.values()
    cached[key] = {
        "summary": res.summary(),
        "rows": res.rows,
        "heldout": heldout,
        "train_loss": train_loss(root / run.name),
        "train_seconds": json.loads((root / run.name / "done.json").read_text())["seconds"],
        "params_per_expert": sum(p.numel() for p in next(iter(experts)).parameters()),
        "params": pipe.num_params(),  # total, active (the largest expert), per expert
        "num_experts": len(pipe.experts),
    }
    path.write_text(json.dumps(cached, indent=1))
    return cached[key]


def training_table(names: list[str], evals: dict[str, dict]) -> str:
    lines = [
        "| run | experts x layers | params total / active per sample | steps | samples | train min "
        "| train loss per expert (last 100 steps) | held-out MSE mean / σ≤0.45 / σ≥0.85 "
        "| colour | shape | motion | all three | flicker |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in names:
        if n not in evals:
            continue
        run, e, s = RUNS[n], evals[n], evals[n]["summary"]
        h = e["heldout"]["routed"]
        low = [v for sg, v in zip(SIGMA_GRID, h) if sg <= 0.45]
        high = [v for sg, v in zip(SIGMA_GRID, h) if sg >= 0.85]
        k, p = e["num_experts"], e["params_per_expert"]
        total, active = (
            (e["params"]["total"], e["params"]["active"]) if "params" in e else (k * p, p)
        )
        tl = ", ".join(f"{x}={v:.4f}" for x, v in e["train_loss"].items() if x != "all")
        lines.append(
            f"| {run.label} | {k} x {run.num_layers} | {total / 1e6:.2f}M / {active / 1e6:.2f}M "
            f"| {run.max_steps} | {32 * run.max_steps} | {e['train_seconds'] / 60:.1f} | {tl} "
            f"| {sum(h) / len(h):.4f} / {sum(low) / len(low):.4f} / {sum(high) / len(high):.4f} "
            f"| {s['colour']:.0%} | {s['shape']:.0%} | {s['motion']:.0%} | {s['all']:.0%} "
            f"| {s['flicker']:.2f} |"
        )
    return "\n".join(lines)


def sigma_table(rows: dict[str, list[float]]) -> str:
    head = "| model / expert | " + " | ".join(f"σ={s}" for s in SIGMA_GRID) + " |"
    lines = [head, "| --- |" + " --- |" * len(SIGMA_GRID)]
    for name, vals in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    return "\n".join(lines)


def plot(names: list[str], evals: dict, root: Path, stem: Path) -> list[str]:
    """Training-loss curves and held-out MSE vs sigma of the runs; returns the PNG names."""
    from vidmoe.io.plots import pyplot

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for n in names:
        if n not in evals:
            continue
        recs = [json.loads(x) for x in (root / n / "log.jsonl").read_text().splitlines() if x]
        for r in recs:
            r["all"] = sum(r["loss"][x] * r["count"][x] for x in r["loss"]) / sum(
                r["count"][x] for x in r["loss"]
            )
        a.plot([r["step"] for r in recs], [r["all"] for r in recs], label=RUNS[n].label)
        b.plot(SIGMA_GRID, evals[n]["heldout"]["routed"], marker="o", label=RUNS[n].label)
    a.set(xlabel="step", ylabel="training velocity MSE (all samples)", yscale="log")
    b.set(xlabel="sigma", ylabel="held-out velocity MSE", yscale="log")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    png = stem.with_name(stem.name + ".png")
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return [png.name]


def run_inference(root: Path, vae_dir: Path, num_prompts: int, seeds) -> str:
    """Swap, boundary sweep and transition bands on the trained two-expert model."""
    from vidmoe.evaluation import evaluate, markdown_table, prompt_set, swapped
    from vidmoe.loading import load_pipeline
    from vidmoe.training.data import LatentCache

    pipe = load_pipeline(root / "moe2" / f"model_{vae_dir.name}", device="cpu", dtype="float32")
    items = prompt_set(num_prompts)
    variants = [("release plan (boundary 0.875, hard)", {}, False), ("experts swapped", {}, True)]
    variants += [(f"boundary {b}", {"boundary": b}, False) for b in (0.5, 0.7, 0.95)]
    variants += [(f"band {w}", {"band": w}, False) for w in (0.05, 0.1)]
    results = []
    for name, extra, swap in variants:
        t0 = time.time()
        results.append(
            evaluate(swapped(pipe) if swap else pipe, items, seeds=seeds, name=name, **extra)
        )
        print(f"{name}: {results[-1].summary()} ({time.time() - t0:.0f}s)", flush=True)
    heldout = heldout_losses(pipe, LatentCache(heldout_cache(root, vae_dir)), experts=(HIGH, LOW))
    del heldout["routed"]
    return (
        f"{markdown_table(results)}\n\nHeld-out velocity MSE of each expert at every sigma "
        f"(it owns σ ≥ 0.875 / σ < 0.875 respectively):\n\n{sigma_table(heldout)}"
    )


def write_section(path: Path, ablation: str, body: str) -> None:
    """Replace the text between this ablation's markers in `path` (append them if missing)."""
    start, end = f"<!-- ablation:{ablation} -->", f"<!-- /ablation:{ablation} -->"
    text = path.read_text() if path.is_file() else ""
    block = f"{start}\n{body}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text + f"\n{block}\n"
    path.write_text(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ablation", choices=sorted(ABLATIONS))
    p.add_argument("--root", type=Path, default=Path("/work/runs/ablations"))
    p.add_argument("--cache", type=Path, default=DEMO / "cache")
    p.add_argument(
        "--vae",
        type=Path,
        default=Path("/work/runs/ablations/vae"),
        help="VAE folder (vae.safetensors + vae_config.json) of the cache's encoder",
    )
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--only", nargs="*", help="the ablation's runs to do now (default: all)")
    p.add_argument("--write", type=Path, help="Markdown file whose section to (re)write")
    p.add_argument("--steps", type=int, default=STEPS, help="S (for smoke tests; default 1000)")
    args = p.parse_args(argv)
    for n, r in RUNS.items():
        RUNS[n] = dataclasses.replace(r, max_steps=args.steps * r.max_steps // STEPS)
    torch.set_num_threads(1)  # the shared 2-core machine: one thread is faster than two
    if not (args.cache / "index.json").is_file():
        raise SystemExit(f"no latent cache at {args.cache} (index.json missing)")
    seeds = tuple(range(args.seeds))
    command = "python benchmarks/ablations.py " + " ".join(sys.argv[1:] if argv is None else argv)
    names = ABLATIONS[args.ablation]
    # a second VAE (e.g. a fine-tuned decoder) gets its own section
    section = args.ablation if args.vae.name == "vae" else f"{args.ablation}@{args.vae.name}"
    todo = args.only if args.only else names
    evals = {}
    for n in names:  # every run of the ablation whose evaluation exists, plus the ones to do now
        ready = (args.root / n / "done.json").is_file()
        if n in todo or ready:
            ensure_trained(RUNS[n], args.root, args.cache, args.vae)
            if args.ablation != "inference":
                evals[n] = evaluate_run(RUNS[n], args.root, args.vae, args.prompts, seeds)
                print(n, json.dumps(evals[n]["summary"]), flush=True)
                if args.write:
                    write_section(args.write, section, _body(args, names, evals, command))
    if args.ablation == "inference":
        body = f"Command: `{command}`\n\n{run_inference(args.root, args.vae, args.prompts, seeds)}"
        if args.write:
            write_section(args.write, section, body)
        print(body)


def _body(args, names, evals, command) -> str:
    pngs = plot(names, evals, args.root, args.write.parent / f"evidence_{args.ablation}")
    done = [n for n in names if n in evals]
    held = {RUNS[n].label: evals[n]["heldout"]["routed"] for n in done}
    return (
        f"Command: `{command}` ({len(done)}/{len(names)} runs done)\n\n"
        f"{training_table(names, evals)}\n\nHeld-out velocity MSE vs sigma (the routed expert):"
        f"\n\n{sigma_table(held)}\n\n" + "\n".join(f"![{p}]({p})" for p in pngs)
    )


if __name__ == "__main__":
    main()
