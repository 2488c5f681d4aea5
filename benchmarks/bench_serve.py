"""Load test of `vidmoe serve` on loopback: concurrent clients submit jobs to a tiny model.

Starts the real server in a subprocess on a free 127.0.0.1 port, runs N client threads that
submit jobs (honouring 429 Retry-After), polls GET /v1/jobs/{id} to measure its latency while
the worker generates, then checks every accepted job finished exactly once.

    python benchmarks/bench_serve.py --clients 8 --jobs 40 --max-queue 16
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, outputs: Path, max_queue: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vidmoe.cli",
            "serve",
            model,
            "--port",
            str(port),
            "--outputs",
            str(outputs),
            "--max-queue",
            str(max_queue),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/v1/health").json()["worker"] != "loading":
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError("server did not start in 120 s")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run(args) -> dict:
    import httpx

    settings = {
        "prompt": "a red circle moving left",
        "width": args.size,
        "height": args.size,
        "num_frames": args.frames,
        "num_steps": args.steps,
    }
    outputs = Path(tempfile.mkdtemp(prefix="bench_serve_")) / "outputs"
    proc, url = start_server(args.model, outputs, args.max_queue)
    accepted: list[str] = []
    rejected_429 = 0
    lock = threading.Lock()
    deadline = time.monotonic() + args.timeout
    per_client = [
        args.jobs // args.clients + (i < args.jobs % args.clients) for i in range(args.clients)
    ]

    def client(n: int) -> None:
        nonlocal rejected_429
        with httpx.Client(base_url=url, timeout=30) as c:
            for i in range(n):
                while time.monotonic() < deadline:
                    r = c.post("/v1/jobs", json={**settings, "seed": i})
                    if r.status_code == 202:
                        with lock:
                            accepted.append(r.json()["id"])
                        break
                    assert r.status_code == 429, r.text
                    with lock:
                        rejected_429 += 1
                    time.sleep(float(r.headers["Retry-After"]))

    latencies: list[float] = []
    stop = threading.Event()

    def poller() -> None:  # GET latency, sampled only while the worker is generating
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                with lock:
                    job_id = accepted[-1] if accepted else None
                if job_id is None:
                    time.sleep(0.01)
                    continue
                t0 = time.perf_counter()
                c.get(f"/v1/jobs/{job_id}").raise_for_status()
                dt = time.perf_counter() - t0
                if c.get("/v1/health").json()["running"]:
                    latencies.append(dt)
                time.sleep(0.02)

    t_start = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in per_client]
    watcher = threading.Thread(target=poller)
    for t in [*threads, watcher]:
        t.start()
    for t in threads:
        t.join()
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            while time.monotonic() < deadline:
                h = c.get("/v1/health").json()
                if h["queued"] == 0 and h["running"] == 0:
                    break
                time.sleep(0.1)
            elapsed = time.monotonic() - t_start
            jobs = c.get("/v1/jobs", params={"limit": 200}).json()["jobs"]
    finally:
        stop.set()
        watcher.join()
        proc.terminate()
        proc.wait(10)
    done = [j for j in jobs if j["status"] == "done"]
    videos = sorted(p.name for p in (outputs / "videos").glob("*.mp4"))
    checks = {
        "accepted_unique": len(set(accepted)) == len(accepted),
        "all_accepted_done": {j["id"] for j in done} == set(accepted),
        "each_ran_once": all(j["attempts"] == 1 for j in done),
        "one_video_each": videos == sorted(f"{i}.mp4" for i in accepted),
    }
    return {
        "clients": args.clients,
        "jobs_asked": args.jobs,
        "accepted": len(accepted),
        "responses_429": rejected_429,
        "done": len(done),
        "seconds": round(elapsed, 1),
        "jobs_per_minute": round(60 * len(done) / elapsed, 1),
        "get_job_latency_ms": {
            "samples": len(latencies),
            "p50": round(1000 * percentile(latencies, 0.5), 2),
            "p95": round(1000 * percentile(latencies, 0.95), 2),
            "max": round(1000 * max(latencies), 2),
        },
        "settings": settings,
        "max_queue": args.max_queue,
        "checks": checks,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-t2v")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--jobs", type=int, default=40)
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600, help="Give up after this many seconds.")
    args = p.parse_args()
    result = run(args)
    print(json.dumps(result, indent=2))
    if not all(result["checks"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
