"""Ulysses and CFG parallel inference on this machine: for each layout, torchrun starts this
script's worker on N processes (the Python API: world from torchrun's variables, `start`,
`Pipeline.set_parallel`), which times one generation after a warm-up and compares rank 0's
latents with the one-process ones. Every process gets `--threads` CPU threads. Run:
    python benchmarks/bench_parallel.py --size 256x256 --frames 17 --steps 4 --threads 1
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LAYOUTS = {  # name -> (ulysses, cfg)
    "1 process": (1, 1),
    "ulysses 2": (2, 1),
    "cfg 2": (1, 2),
    "ulysses 4": (4, 1),
    "ulysses 2 x cfg 2": (2, 2),
}


def worker(args) -> None:
    """One rank under torchrun: generate with the layout, rank 0 saves latents and times."""
    import torch

    from vidmoe.loading import build_random_pipeline
    from vidmoe.parallel.world import Groups, Layout, device_for, start, stop, world_from_env

    world = world_from_env(os.environ)
    start(world, device_for(world, "cpu"))
    pipe = build_random_pipeline(args.model)
    layout = Layout(ulysses=args.ulysses, cfg=args.cfg)
    if layout.size > 1:
        pipe.set_parallel(Groups(layout, world))
    width, height = (int(v) for v in args.size.split("x"))
    kw = dict(width=width, height=height, num_frames=args.frames, seed=0, output="latents")
    pipe.generate(args.prompt, num_steps=1, **kw)  # warm-up
    r = pipe.generate(args.prompt, num_steps=args.steps, **kw)
    if world.is_main:
        torch.save({"latents": r.latents, "denoise": r.timings["denoise"]}, args.worker)
    stop()


def run(name: str, args, out: Path) -> dict:
    import torch

    ulysses, cfg = LAYOUTS[name]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(ulysses * cfg), __file__, "--worker", str(out)]
    cmd += ["--ulysses", str(ulysses), "--cfg", str(cfg)]
    for key in ("model", "prompt", "size", "frames", "steps"):
        cmd += [f"--{key}", str(getattr(args, key))]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return torch.load(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-t2v")
    p.add_argument("--prompt", default="a red circle moving to the right")
    p.add_argument("--size", default="256x256", help="WIDTHxHEIGHT")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated names")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ulysses", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--cfg", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    print(
        f"{args.model} {args.size}, {args.frames} frames, {args.steps} steps, {args.threads} thread(s) per process"
    )
    print("| layout | processes | denoise s | s per step | speed-up | latents vs 1 process |")
    print("|---|---|---|---|---|---|")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.layouts.split(",")):
            r = run(name, args, Path(tmp) / f"{i}.pt")
            base = base or r
            rel = float((r["latents"] - base["latents"]).norm() / base["latents"].norm())
            ulysses, cfg = LAYOUTS[name]
            print(
                f"| {name} | {ulysses * cfg} | {r['denoise']:.2f} | {r['denoise'] / args.steps:.3f} "
                f"| {base['denoise'] / r['denoise']:.2f}x | {rel:.1e} |"
            )


if __name__ == "__main__":
    main()
