"""Time a queue of jobs through a real `vidmoe serve`: one process, or under torchrun.

    python benchmarks/bench_serve_parallel.py --jobs 4                               # one process
    python benchmarks/bench_serve_parallel.py --jobs 4 --nproc 2 -- --expert-groups 2
    python benchmarks/bench_serve_parallel.py --jobs 4 --nproc 2 -- --cfg-parallel

Starts the server (the demo model unless --model; CPU, one thread per process), waits until the
model is loaded, submits JOBS jobs at once over HTTP, and prints the wall time from the first
submit to the last job done, jobs per minute and, with expert groups, how long both groups
worked at the same time (from the `stages` of each video's record). Then stops the server.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overlap_seconds(records: list[dict]) -> float:
    """Seconds during which two different jobs were being worked on by different groups."""
    spans = [(s["start"], s["end"], i) for i, r in enumerate(records) for s in r.get("stages", [])]
    total = 0.0
    for a0, a1, i in spans:
        for b0, b1, j in spans:
            if i < j:
                total += max(0.0, min(a1, b1) - max(a0, b0))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--nproc", type=int, default=1, help="1: plain `vidmoe serve`")
    ap.add_argument("--model", default=None)
    ap.add_argument("--settings", default="{}", help="JSON fields of every job")
    ap.add_argument("flags", nargs="*", help="serve flags after --, e.g. --expert-groups 2")
    args = ap.parse_args()
    port, out = free_port(), Path(tempfile.mkdtemp(prefix="bench-serve-"))
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": src}
    serve = ["serve", *([args.model] if args.model else []), "--device", "cpu"]
    serve += ["--port", str(port), "--outputs", str(out), "--log-level", "warning", *args.flags]
    if args.nproc == 1:
        cmd = [sys.executable, "-m", "vidmoe", *serve]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc-per-node", str(args.nproc), "-m", "vidmoe", *serve]
    log = open(out / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited; see {out / 'server.log'}")
            try:
                if client.get("/v1/health").json()["worker"] != "loading":
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        settings = json.loads(args.settings)
        t0 = time.perf_counter()
        ids = [
            client.post("/v1/jobs", json={"prompt": f"job {i}", "seed": i, **settings}).json()["id"]
            for i in range(args.jobs)
        ]
        while True:
            jobs = [client.get(f"/v1/jobs/{i}").json() for i in ids]
            if all(j["status"] in ("done", "failed", "cancelled") for j in jobs):
                break
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        statuses = [j["status"] for j in jobs]
        records = [json.loads((out / "videos" / f"{i}.mp4.json").read_text()) for i in ids]
        layout = f"{args.nproc} process(es) {' '.join(args.flags)}".strip()
        print(
            f"{layout}: {args.jobs} jobs {statuses.count('done')} done in {wall:.1f} s "
            f"({60 * args.jobs / wall:.2f} jobs/min); groups busy together "
            f"{overlap_seconds(records):.1f} s"
        )
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(120)
        log.close()


if __name__ == "__main__":
    main()
