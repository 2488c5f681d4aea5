"""Measuring what the planner predicts (`vidmoe.planner`): the peak RSS of a fresh process that
loads a model and generates one clip, and the baseline of one that only imports. Linux only
(VmHWM from /proc/self/status); the tests and benchmarks/bench_planner.py compare these with
`predict`.
"""

from __future__ import annotations

from pathlib import Path

from vidmoe.planner import DTYPE_BYTES, MemoryRequest

# How a measured run is set up: one thread, and glibc's mmap threshold fixed, so that a freed
# large tensor goes back to the system and the peak RSS is the tensors' peak plus the process
# baseline. Without it glibc raises the threshold as tensors are freed and keeps later ones in
# its heap: an unconfigured process then peaks up to about 150 MiB higher, by allocation order
# (docs/planner.md, "Accuracy").
MEASURE_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}


_MEASURE = """
import json, sys
import torch
from vidmoe.loading import load_pipeline
torch.set_num_threads(1)
model, width, height, frames, dtype, residency = json.loads(sys.argv[1])
pipe = load_pipeline(model, device="cpu", dtype=dtype, residency=residency)
pipe.generate("a red circle moving left", width=width, height=height, num_frames=frames, num_steps=2)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps(int(status["VmHWM"].split()[0]) * 1024))
"""


_BASELINE = """
import torch, transformers
import vidmoe.loading
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["VmHWM"].split()[0]) * 1024)
"""


def measure_baseline_rss(*, timeout: float = 120) -> int:
    """Peak RSS (bytes) of a fresh process that has imported torch, transformers and vidmoe, set
    up as `measure_peak_rss`'s: what this installation measures for `CPU_BASELINE` (shared
    libraries' pages count, so it differs between installations by tens of MiB). Linux only."""
    return _run_measure(_BASELINE, [], timeout=timeout)


def measure_peak_rss(model: str | None, request: MemoryRequest, *, timeout: float = 600) -> int:
    """Peak RSS (VmHWM, bytes) of a fresh process that loads `model` on the CPU under the
    request's dtype and residency and generates one clip of its size (2 steps). Linux only."""
    import json

    if request.device != "cpu":
        raise ValueError(f"measure_peak_rss measures CPU runs; got device {request.device!r}")
    dtype = {2: "bfloat16", 4: "float32"}[DTYPE_BYTES[request.dtype]]
    args = [model, request.width, request.height, request.num_frames, dtype, request.residency]
    return _run_measure(_MEASURE, [json.dumps(args)], timeout=timeout)


def measure_env() -> dict[str, str]:
    """The environment of a measured process: this one's, with this vidmoe importable and
    MEASURE_ENV's settings."""
    import os

    import vidmoe

    src = str(Path(vidmoe.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    return env | MEASURE_ENV


def _run_measure(code: str, argv: list[str], *, timeout: float) -> int:
    """Run `code` in a fresh interpreter under MEASURE_ENV; the integer it prints last."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=measure_env(),
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"the measured run failed: {out.stderr.strip().splitlines()[-1:]}")
    return int(out.stdout.strip().splitlines()[-1])
