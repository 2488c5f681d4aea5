"""Start a real `vidmoe serve` in a subprocess on a free loopback port, and talk to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SMALL = {"width": 32, "height": 32, "num_frames": 5, "num_steps": 2}
"""Settings that make a tiny-t2v job take about a second."""
FINISHED = ("done", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `python -m vidmoe.cli serve tiny-t2v` process."""

    def __init__(
        self,
        outputs: Path,
        *,
        token: str | None = None,
        max_queue: int = 64,
        device: str = "cpu",
        extra: tuple[str, ...] = (),
    ):
        self.outputs, self.token, self.max_queue = Path(outputs), token, max_queue
        self.device, self.extra = device, tuple(extra)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> Server:
        self.port = free_port()
        args = [
            sys.executable,
            "-m",
            "vidmoe.cli",
            "serve",
            "tiny-t2v",
            "--port",
            str(self.port),
            "--outputs",
            str(self.outputs),
            "--device",
            self.device,
            "--max-queue",
            str(self.max_queue),
            "--log-level",
            "warning",
            *self.extra,
        ]
        if self.token:
            args += ["--token", self.token]
        env = {k: v for k, v in os.environ.items() if k != "VIDMOE_TOKEN"}
        self.log = open(self.outputs.parent / f"{self.outputs.name}-server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"server exited with {self.proc.returncode}; see {self.log.name}"
                    )
                try:
                    health = c.get("/v1/health").json()
                    if health["worker"] not in ("loading",):
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout} s; see {self.log.name}")

    def client(self, *, auth: bool = True) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token and auth else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if not self.log.closed:
            self.log.close()


def submit(client: httpx.Client, **settings) -> str:
    r = client.post("/v1/jobs", json=settings)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_for(
    client: httpx.Client,
    job_id: str,
    until=lambda job: job["status"] in FINISHED,
    timeout: float = 60,
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not get there in {timeout} s: {job}")
