"""The one worker thread: loads the model, then takes jobs from the queue one at a time and
runs them off the event loop.

Progress is written to the job store after every step (steps done, the expert at work now,
the phase). A cancel request stops a running job at its next step, or at the next latent frame
of the VAE decode. Video and JSON are written under temporary names and renamed, and only then
is the job marked done, so a crash at any point leaves either no file or a complete one, and
the job runs again after a restart. A job that raises is `failed` with the reason; the worker
goes on with the next one. A model that fails to load leaves the worker in `error` (the server
then refuses new jobs with 503; queued ones wait for a server that loads the model).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from vidmoe.sampling.settings import GenerateSettings, Limits
from vidmoe.serve.queue import JobStore

log = logging.getLogger("vidmoe.serve")


class JobCancelled(Exception):
    """Raised from the step callback to stop a cancelled job."""


class Worker(threading.Thread):
    """Runs queued jobs through one pipeline, one at a time."""

    def __init__(
        self,
        store: JobStore,
        load: Callable[[], object],
        videos_dir: Path,
        *,
        limits: Limits | None = None,
    ):
        super().__init__(name="vidmoe-worker", daemon=True)
        self.store, self.load, self.videos_dir = store, load, Path(videos_dir)
        self.limits = limits
        """The server's limits, set on the pipeline once loaded: every job is checked against
        them, not the model's defaults (an operator may raise them). None: the pipeline's."""
        self.pipe = None
        self.state = "loading"
        """loading, idle, busy, stopped or error."""
        self.load_error: str | None = None
        self.current: str | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._cancel: set[str] = set()

    # -- called from the server ----------------------------------------------------------------
    def notify(self) -> None:
        """A job was queued."""
        self._wake.set()

    def request_cancel(self, job_id: str) -> None:
        self._cancel.add(job_id)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self.current is not None:
            self._cancel.add(self.current)
        self.join(timeout)

    # -- the thread --------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.pipe = self._load()
            if self.limits is not None and self.pipe is not None:
                self.pipe.limits = self.limits
        except Exception as e:  # the server stays up and says why in /v1/health
            self.state, self.load_error = "error", f"{type(e).__name__}: {e}"
            log.error("model failed to load: %s", self.load_error)
            return
        self.state = "idle"
        try:
            self._loop()
        finally:
            self._stopped()
            self.state = "stopped"

    def _loop(self) -> None:
        while not self._stopping.is_set():
            job = self.store.claim_next()
            if job is None:
                self._idle()
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            self.state, self.current = "busy", job["id"]
            try:
                self._run(job)
            except Exception as e:  # the job store itself failed: never leave the job running
                log.error("job %s: %s", job["id"], traceback.format_exc())
                with contextlib.suppress(Exception):
                    self.store.finish(job["id"], "failed", error=f"{type(e).__name__}: {e}")
            finally:
                self._cancel.discard(job["id"])
                self.state, self.current = "idle", None

    def check_plan(self, plan) -> None:
        """ValueError if this worker cannot run `plan` (checked before a job is queued)."""

    # -- what a worker under torchrun changes (serve/distributed.py) ---------------------------
    def _load(self):
        return self.load()

    def _idle(self) -> None:
        """Called when the queue is empty, about every half second."""

    def _stopped(self) -> None:
        """Called once when the loop ends (the model loaded)."""

    def _stop_now(self, job_id: str) -> bool:
        """Whether the running job stops at this step (every rank must agree under torchrun)."""
        return self._cancelled(job_id)

    def _generate(self, job: dict, settings: GenerateSettings, on_step, on_chunk):
        return self.pipe.generate(settings, callback=on_step, decode_callback=on_chunk)

    def _cancelled(self, job_id: str) -> bool:
        return job_id in self._cancel or self.store.cancel_requested(job_id)

    def _run(self, job: dict) -> None:
        job_id = job["id"]
        if self._cancelled(job_id):
            self.store.finish(job_id, "cancelled")
            return
        try:
            steps = job["plan"]["steps"]
            settings = GenerateSettings(**job["request"])
        except Exception:  # a row written by another version, or edited by hand
            self.store.finish(job_id, "failed", error="the stored job cannot be read; resubmit it")
            return
        self.store.progress(job_id, step=0, experts=steps[0]["experts"], phase="denoise")

        def on_chunk(index: int, num_chunks: int) -> None:
            if self._cancelled(job_id):
                raise JobCancelled(job_id)

        def on_step(index: int, num_steps: int, experts) -> None:
            if self._stop_now(job_id):
                raise JobCancelled(job_id)
            done = index + 1
            upcoming = steps[done]["experts"] if done < num_steps else None
            self.store.progress(
                job_id,
                step=done,
                experts=upcoming,
                phase="denoise" if done < num_steps else "decode",
            )

        started = time.perf_counter()
        try:
            result = self._generate(job, settings, on_step, on_chunk)
            if self._cancelled(job_id):
                raise JobCancelled(job_id)
            self.store.progress(job_id, step=len(steps), experts=None, phase="write")
            timings = self._write(job_id, result, started)
        except JobCancelled:
            if self._stopping.is_set() and not self.store.cancel_requested(job_id):
                self.store.requeue(job_id)  # shutting down: run it again after a restart
            else:
                self.store.finish(job_id, "cancelled")
            return
        except Exception as e:
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            self.store.finish(job_id, "failed", error=f"{type(e).__name__}: {e}")
            return
        self.store.finish(job_id, "done", timings={k: round(v, 4) for k, v in timings.items()})

    def _write(self, job_id: str, result, started: float) -> dict[str, float]:
        return publish_job(self.pipe, job_id, result, started, self.videos_dir)


def publish_job(
    pipe, job_id: str, result, started: float, videos_dir: Path, *, extra: dict | None = None
) -> dict[str, float]:
    """The mp4 and its JSON (`extra` added to the record), published as one unit
    (`publish_video`); the job's timings."""
    from vidmoe.io.video import publish_video

    t0 = time.perf_counter()
    timings = {**result.timings, "total": t0 - started}
    record = {
        "id": job_id,
        "settings": result.settings.to_dict(),
        "model": pipe.source,
        "plan": result.plan.to_dict(),
        "trace": result.trace,
        "timings": timings,
        **(extra or {}),
    }
    publish_video(result.frames, record, Path(videos_dir) / f"{job_id}.mp4", fps=pipe.config.fps)
    return {
        **timings,
        "write": time.perf_counter() - t0,
        "total": time.perf_counter() - started,
    }
