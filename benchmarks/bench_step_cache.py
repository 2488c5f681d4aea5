"""The step cache on the shipped demo: steps skipped, time, difference from the uncached video,
and held-out adherence, per threshold; plus per-expert thresholds calibrated for a target
fraction of skipped steps.

Every threshold runs the same prompts and seeds in one process, the uncached run first, so the
times are ratios measured side by side. Run:
    python benchmarks/bench_step_cache.py --prompts 24 --seeds 0 --thresholds 0.05,0.1,0.2,0.3
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch


def calibrate(pipe, items, seeds, fraction: float) -> dict[str, float]:
    """Per expert, the threshold below which `fraction` of its comparable steps fall."""
    changes: dict[str, list[float]] = {n: [] for n in pipe.config.moe.expert_names}
    for item in items:
        for seed in seeds:
            r = pipe.generate(item.prompt, seed=seed, output="latents", step_cache=1e-12)
            for row in r.trace:
                for name, value in row.get("cache_change", {}).items():
                    changes[name].append(value)
    return {n: float(np.quantile(v, fraction)) if v else 0.0 for n, v in changes.items()}


def run(pipe, items, seeds, step_cache, reference=None):
    from vidmoe.world.analyser import analyse

    denoise = 0.0
    frames, skipped, steps, right = [], 0, 0, 0
    for item in items:
        for seed in seeds:
            r = pipe.generate(item.prompt, seed=seed, step_cache=step_cache)
            denoise += r.timings["denoise"]  # the loop the cache shortens (not text, not decode)
            frames.append(r.frames.astype(np.float32))
            skipped += sum(len(row.get("cached", [])) for row in r.trace)
            steps += sum(len(row["experts"]) for row in r.trace)
            reading = analyse(r.frames)
            right += (reading.colour, reading.shape, reading.motion) == (
                item.colour,
                item.shape,
                item.motion,
            )
    seconds = denoise
    diff = (
        math.nan
        if reference is None
        else float(np.mean([np.abs(a - b).mean() for a, b in zip(frames, reference)]))
    )
    return dict(
        seconds=seconds, skipped=skipped / steps, diff=diff, adherence=right / len(frames)
    ), frames


def main() -> None:
    from vidmoe.evaluation import prompt_set
    from vidmoe.loading import load_pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--thresholds", default="0.05,0.1,0.2,0.3")
    ap.add_argument("--calibrate", default="0.3,0.5", help="target skipped fractions")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(None, device="cpu")
    items = prompt_set(args.prompts)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    pipe.generate(items[0].prompt, seed=0)  # warm-up: first-call costs out of the timings
    base, ref = run(pipe, items, seeds, None)
    rows = [("off", base)]
    for t in args.thresholds.split(","):
        rows.append((t, run(pipe, items, seeds, float(t), ref)[0]))
    for f in args.calibrate.split(","):
        thresholds = calibrate(pipe, items[:4], seeds, float(f))
        label = f"calibrated {float(f):.0%}: " + ",".join(
            f"{n}={v:.3g}" for n, v in thresholds.items()
        )
        rows.append((label, run(pipe, items, seeds, thresholds, ref)[0]))
    print(f"demo, {len(items)} held-out prompts x seeds {seeds}, {args.threads} threads, 25 steps")
    print(
        "| step cache | expert steps skipped | denoising time (x uncached) | mean abs diff vs uncached (of 255) | all three right |"
    )
    print("| --- | --- | --- | --- | --- |")
    for label, r in rows:
        diff = "-" if math.isnan(r["diff"]) else f"{r['diff']:.2f}"
        print(
            f"| {label} | {r['skipped']:.0%} | {r['seconds'] / base['seconds']:.2f} | {diff} | {r['adherence']:.1%} |"
        )


if __name__ == "__main__":
    main()
