"""Run a function on N real CPU processes joined by gloo, as torchrun would, and collect each
rank's return value. The function must be importable (module level) and return something
`torch.save` can write; an exception on any rank fails the call with that rank's traceback."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from vidmoe.parallel.world import World, start, stop


def _child(rank: int, size: int, folder: str, target, args) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    out = Path(folder) / f"rank{rank}.pt"
    try:
        start(
            World(rank=rank, size=size, local_rank=rank),
            torch.device("cpu"),
            init_method=f"file://{folder}/store",
            timeout_s=120,
        )
        result = target(rank, size, *args)
        torch.save({"ok": result}, out)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, out)
        raise
    finally:
        stop()


def run_ranks(target, size: int, folder: Path, *args, timeout: float = 120.0) -> list:
    """target(rank, size, *args) on `size` spawned processes; the list of their results."""
    folder.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(
        _child,
        args=(size, str(folder), target, args),
        nprocs=size,
        join=False,
        start_method="spawn",
    )
    try:
        while not ctx.join(timeout=timeout):
            pass
    except Exception as exc:
        errors = []
        for r in range(size):
            p = folder / f"rank{r}.pt"
            if p.exists():
                rec = torch.load(p, weights_only=False)
                if "error" in rec:
                    errors.append(f"rank {r}:\n{rec['error']}")
        raise AssertionError("\n".join(errors) or str(exc)) from exc
    return [torch.load(folder / f"rank{r}.pt", weights_only=False)["ok"] for r in range(size)]
