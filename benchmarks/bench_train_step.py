"""Training-step time of one expert of a training config: eager fp32 (the reference, ratio 1.0)
against torch.compile and bf16 autocast, in the same process. A step is forward, velocity MSE,
backward and AdamW on a batch of random latents of the given size, as `vidmoe train` runs it with
`compile` / `use_bf16`.

    python benchmarks/bench_train_step.py recipes/demo/low_noise_01_constant.toml low_noise \\
        --frames 5 --size 16 --batch 32 --threads 2 --write docs/performance.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from vidmoe.models.transformer import WanTransformer
from vidmoe.training.config import load_train_config

MODES = [
    ("eager", False, False),
    ("compiled", True, False),
    ("eager", False, True),
    ("compiled", True, True),
]


def step_times(expert: WanTransformer, batch, *, bf16: bool, repeats: int, warmup: int):
    opt = torch.optim.AdamW(expert.parameters(), lr=1e-5)
    x, t, ctx, target = batch
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = expert(x, t, ctx)
        loss = (out.float() - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="a vidmoe train TOML/JSON")
    ap.add_argument("expert", help="which expert's architecture (its expert_overrides apply)")
    ap.add_argument("--frames", type=int, default=5, help="latent frames")
    ap.add_argument("--size", type=int, default=16, help="latent height = width")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", default=None, help="append the table to this markdown file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_train_config(args.config)
    arch = cfg.transformer_for(args.expert)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, arch.in_dim, args.frames, args.size, args.size, generator=g)
    batch = (
        x,
        torch.rand(args.batch, generator=g),
        torch.randn(args.batch, arch.text_len, arch.text_dim, generator=g),
        torch.randn_like(x),
    )
    rows, reference = [], None
    for mode, compiled, bf16 in MODES:
        torch.manual_seed(0)
        expert = WanTransformer(arch).train()
        if compiled:
            expert.compile()
        times = step_times(
            expert, batch, bf16=bf16, repeats=args.repeats, warmup=3 if compiled else 1
        )
        median = statistics.median(times)
        reference = reference or median
        rows.append((mode, "bf16 autocast" if bf16 else "fp32", median, reference / median))
        print(rows[-1], flush=True)
    command = "python benchmarks/bench_train_step.py " + " ".join(sys.argv[1:])
    table = [
        "## Training step: torch.compile and bf16 autocast",
        "",
        f"Training step of `{args.expert}` from `{args.config}` (batch {args.batch}, latent "
        f"{arch.in_dim}x{args.frames}x{args.size}x{args.size}; {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, torch {torch.__version__}; median of {args.repeats}):",
        "",
        "| mode | precision | s / step | speed-up vs eager fp32 |",
        "| --- | --- | --- | --- |",
        *[f"| {m} | {p} | {s:.3f} | {r:.2f}x |" for m, p, s, r in rows],
        "",
        "```",
        command,
        "```",
        "",
    ]
    print("\n".join(table))
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n\n" + "\n".join(table))


if __name__ == "__main__":
    main()
