"""Throughput of a batch of prompts: one process, lines split across ranks, or expert-pipelined
groups. Times the batch alone (the model is loaded and one warm-up video made first), on rank 0.

    python benchmarks/bench_batch.py --prompts 8                          # one process
    torchrun --nproc-per-node 2 benchmarks/bench_batch.py --prompts 8     # lines split
    torchrun --nproc-per-node 2 benchmarks/bench_batch.py --prompts 8 --expert-groups 2

Prints one line: mode, ranks, prompts, seconds, videos per minute, the plan's steps per expert.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist

PROMPTS = [
    "a red circle moving to the right",
    "a blue star going up",
    "a green triangle sliding left",
    "a yellow square moving down",
]


def main() -> None:
    from vidmoe.batch import Job, generate_batch
    from vidmoe.loading import load_pipeline
    from vidmoe.parallel.pipelined import generate_pipelined, make_stage
    from vidmoe.parallel.world import Groups, Layout, device_for, start, stop, world_from_env
    from vidmoe.sampling.settings import GenerateSettings

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the demo model")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--expert-groups", type=int, default=1)
    ap.add_argument("--boundary", default=None, help="e.g. steps:12 (default: the model's)")
    args = ap.parse_args()
    world = world_from_env(os.environ)
    device = device_for(world, "auto")
    start(world, device)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    pipe = load_pipeline(args.model, device=str(device))
    base = GenerateSettings(boundary=args.boundary)
    jobs = [
        Job(index=i, line=i + 1, name=f"{i:04d}", settings=_with(base, PROMPTS[i % 4], i))
        for i in range(args.prompts)
    ]
    pipe.generate(jobs[0].settings, output="latents")  # warm-up, outside the timing
    counts = pipe.plan(jobs[0].settings).counts()
    if args.expert_groups > 1:
        layout = Layout(expert_groups=args.expert_groups).filling(world)  # replicas beyond one
        stage = make_stage(pipe, Groups(layout, world))
        del pipe
    box = [tempfile.mkdtemp(prefix="bench_batch_") if world.is_main else None]
    if world.distributed:  # one folder for every rank, as on a shared file system
        dist.broadcast_object_list(box, src=0)
    out = box[0]
    try:
        if world.distributed:
            dist.barrier()
        t0 = time.perf_counter()
        if args.expert_groups > 1:
            report = generate_pipelined(stage, jobs, out)
        else:
            report = generate_batch(pipe, jobs, out, world=world)
        seconds = time.perf_counter() - t0
        if world.distributed:
            dist.barrier()  # every video published
        busy = _busy(out)
    finally:
        if world.is_main:
            shutil.rmtree(out)
    assert report.ok, report.summary()
    if world.is_main:
        mode = "pipelined" if args.expert_groups > 1 else "split" if world.distributed else "single"
        print(
            f"{mode} ranks={world.size} prompts={args.prompts} seconds={seconds:.1f} "
            f"videos/min={60 * args.prompts / seconds:.2f} steps={counts} "
            f"threads/rank={torch.get_num_threads()}"
        )
        print("  recorded seconds, summed over the videos: " + busy)
    stop()


def _busy(out: str) -> str:
    """The recorded text / denoise / decode seconds, summed over the videos."""
    import json
    from pathlib import Path

    total: dict[str, float] = {}
    for record in Path(out).glob("*.mp4.json"):
        for k, v in json.loads(record.read_text())["timings"].items():
            total[k] = total.get(k, 0.0) + v
    return ", ".join(f"{k} {v:.1f}" for k, v in total.items())


def _with(base, prompt: str, seed: int):
    import dataclasses

    return dataclasses.replace(base, prompt=prompt, seed=seed)


if __name__ == "__main__":
    main()
