"""fp8 weights on the shipped demo: stored bytes of the experts, output difference from the
unquantised run on the same seeds, held-out adherence, and time, all in one process.

    python benchmarks/bench_fp8.py --prompts 12 --seeds 0
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def run(pipe, items, seeds):
    from vidmoe.world.analyser import analyse

    frames, right, t0 = [], 0, time.perf_counter()
    for item in items:
        for seed in seeds:
            r = pipe.generate(item.prompt, seed=seed)
            frames.append(r.frames.astype(np.float32))
            reading = analyse(r.frames)
            right += (reading.colour, reading.shape, reading.motion) == (
                item.colour,
                item.shape,
                item.motion,
            )
    return frames, right / len(frames), time.perf_counter() - t0


def main() -> None:
    from vidmoe.evaluation import prompt_set
    from vidmoe.loading import load_pipeline
    from vidmoe.models.fp8 import fp8_bytes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    items, seeds = prompt_set(args.prompts), tuple(int(s) for s in args.seeds.split(","))
    rows = []
    base_frames = None
    for label, kw in (
        ("float32 (default on the CPU)", {}),
        ("bfloat16", {"dtype": "bfloat16"}),
        ("fp8 block weights, float32 compute", {"quantize": "fp8"}),
        ("fp8 block weights, bfloat16 compute", {"quantize": "fp8", "dtype": "bfloat16"}),
    ):
        pipe = load_pipeline(None, device="cpu", **kw)
        stored = sum(fp8_bytes(e) for e in pipe.experts.values())
        pipe.generate(items[0].prompt, seed=0)  # warm-up: first-call costs out of the timings
        frames, adherence, seconds = run(pipe, items, seeds)
        if base_frames is None:
            base_frames, base_seconds = frames, seconds
        diff = np.mean([np.abs(a - b).mean() for a, b in zip(frames, base_frames)])
        worst = max(np.abs(a - b).max() for a, b in zip(frames, base_frames))
        rows.append((label, stored, diff, worst, adherence, seconds / base_seconds))
    print(f"demo, {len(items)} held-out prompts x seeds {seeds}, {args.threads} threads, 25 steps")
    print(
        "| weights | experts stored | mean abs diff vs float32 (of 255) | max | all three right | time (x float32) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for label, stored, diff, worst, adherence, ratio in rows:
        print(
            f"| {label} | {stored / 2**20:.1f} MiB | {diff:.2f} | {worst:.0f} | {adherence:.1%} | {ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
