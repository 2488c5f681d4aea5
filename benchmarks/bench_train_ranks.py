"""Training steps per second of a small config on 1 process and on N processes under torchrun
(DDP and FSDP2, gloo on the CPU), the same global batch and the same total CPU threads.

    python benchmarks/bench_train_ranks.py --ranks 2 --threads 2 --steps 30

Each run is `torchrun --standalone --nproc-per-node N -m vidmoe train CONFIG` on a fresh out_dir;
steps/s is read from log.jsonl between the first and the last log line (start-up excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _cache(folder: Path) -> None:
    from tests.training.conftest import HashTextEncoder, PoolVAE, fake_clips
    from vidmoe.training.data import build_latent_cache

    clips = fake_clips(32, num_frames=9, size=32)  # latents (4, 2, 8, 8): 32 tokens
    build_latent_cache(clips, PoolVAE(), HashTextEncoder(), folder, text_len=8)


def _config(cache: Path, out: Path, *, steps: int, batch: int, threads: int, strategy: str):
    from tests.training.conftest import TINY_EXPERT, tiny_run

    arch = {**TINY_EXPERT.to_dict(), "dim": 64, "ffn_dim": 256, "num_heads": 2, "num_layers": 2}
    return tiny_run(
        cache,
        out,
        transformer=arch,
        batch_size=batch,
        max_steps=steps,
        log_every=10,
        checkpoint_every=steps,
        num_threads=threads,
        distributed={"strategy": strategy},
    )


def run(ranks: int, threads: int, strategy: str, root: Path, args) -> float:
    out = root / f"{strategy}_{ranks}x{threads}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = _config(
        root / "cache", out, steps=args.steps, batch=args.batch, threads=threads, strategy=strategy
    )
    path = root / f"{out.name}.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={ranks}", "-m", "vidmoe", "train", str(path)]
    subprocess.run(cmd, env=env, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    return (log[-1]["step"] - log[0]["step"]) / (log[-1]["seconds"] - log[0]["seconds"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="CPU threads in all, split over ranks")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8, help="the global batch")
    p.add_argument("--repeats", type=int, default=2, help="runs of each case (median shown)")
    args = p.parse_args()
    per_rank = max(args.threads // args.ranks, 1)
    cases = [(1, args.threads, "ddp"), (1, per_rank, "ddp")]
    cases += [(args.ranks, per_rank, s) for s in ("ddp", "fsdp")]
    rates: dict[tuple, list[float]] = {c: [] for c in dict.fromkeys(cases)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _cache(root / "cache")
        for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits all
            for case in rates:
                rates[case].append(run(*case, root, args))
    base = statistics.median(rates[cases[0]])
    for (ranks, threads, strategy), got in rates.items():
        rate = statistics.median(got)
        what = "1 process" if ranks == 1 else f"{ranks} processes ({strategy})"
        print(f"{what}, {threads} thread(s) each: {rate:.2f} steps/s ({rate / base:.2f}x)")


if __name__ == "__main__":
    main()
