"""`vidmoe serve` under torchrun: rank 0 runs the HTTP app, the job store and the worker thread;
the other ranks follow, with no HTTP.

Split requests (Ulysses, CFG, sharded experts): rank 0's worker claims a job and broadcasts it
(id and settings) to every rank; all run `Pipeline.generate` together, and rank 0's stop
decision is broadcast after every step, so a cancelled job ends on every rank at the same step
and no rank is left in a collective. Rank 0 decodes, publishes and finishes the job.

Expert groups (one expert per group): a stream. Group 0 takes the next job from rank 0's queue,
runs its expert's steps and sends the state on to group 1 (the job's id and settings inside the
message), then takes the next job at once; the last group's writer decodes, publishes into the
server's videos folder and finishes the job in the same SQLite store, so both groups work on
different requests at once. Each group's first rank writes its progress rows and decides, from
the store, when its group stops a cancelled job. The store and videos folder are shared: one
node (or a shared file system). No world-wide collective runs per job.

Idle ranks would wait in a collective forever (and time out): rank 0 sends a heartbeat every
`Team.heartbeat_s` while the queue is empty, and a stop message when the server shuts down.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from vidmoe.parallel.pipelined import Stage, _denoise, _finish, _start, phase_ranges
from vidmoe.parallel.transport import Outgoing, recv_message, send_message
from vidmoe.parallel.world import World
from vidmoe.sampling.settings import GenerateSettings
from vidmoe.serve.queue import JobStore
from vidmoe.serve.worker import JobCancelled, Worker, publish_job

log = logging.getLogger("vidmoe.serve")

IDLE, STOP, JOB = "idle", "stop", "job"


@dataclass(frozen=True, kw_only=True)
class Team:
    """The ranks of one `vidmoe serve` under torchrun, as this rank sees them."""

    world: World
    device: torch.device
    """This rank's device (its local rank's GPU, or the CPU)."""
    expert_groups: int = 1
    """1: every rank runs every request together; >1: one expert per group, a stream."""
    heartbeat_s: float = 30.0
    """Seconds between messages to idle ranks (well under the process group's timeout)."""

    @property
    def wire(self) -> torch.device:
        """Where small control tensors go: the GPU under NCCL, else the CPU."""
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def bind(self) -> None:
        """Make this thread's CUDA device the rank's (the device is per thread)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)


def load_together(team: Team, load: Callable[[], object], limits=None) -> tuple[object, object]:
    """`load()` on every rank, then agreed: (what it returned, rank 0's limits) everywhere, or a
    ValueError naming each rank that failed (on every rank, so that none waits for the others)."""
    team.bind()
    loaded, error = None, None
    try:
        loaded = load()
    except Exception as e:
        log.error("rank %d: the model failed to load:\n%s", team.world.rank, traceback.format_exc())
        error = f"{type(e).__name__}: {e}"
    gathered: list = [None] * team.world.size
    dist.all_gather_object(gathered, (error, limits))
    failed = [f"rank {r}: {e}" for r, (e, _) in enumerate(gathered) if e]
    if failed:
        raise ValueError("; ".join(failed))
    return loaded, gathered[0][1]


def _agree(team: Team, decision: bool, src: int, group, size: int) -> bool:
    """`src`'s decision on every rank of `group` (None: the world) of `size` ranks."""
    if size == 1:
        return decision
    flag = torch.tensor([int(decision)], device=team.wire)
    dist.broadcast(flag, src=src, group=group)
    return bool(flag.item())


def _broadcast(team: Team, message: dict | None, src: int, group=None) -> dict:
    box = [message]
    dist.broadcast_object_list(box, src=src, group=group, device=team.wire)
    return box[0]


class TeamWorker(Worker):
    """Rank 0's worker under torchrun: tells the other ranks each job (`_send`), a heartbeat
    while the queue is empty, and the stop."""

    def __init__(self, store, load, videos_dir, *, limits=None, team: Team):
        super().__init__(store, load, videos_dir, limits=limits)
        self.team, self._last_heard = team, time.monotonic()

    def _send(self, message: dict) -> None:
        raise NotImplementedError

    def _tell(self, message: dict) -> None:
        self._send(message)
        self._last_heard = time.monotonic()

    def _idle(self) -> None:
        if time.monotonic() - self._last_heard >= self.team.heartbeat_s:
            self._tell({"kind": IDLE})

    def _stopped(self) -> None:
        try:
            self._tell({"kind": STOP})
            self._close()
        except RuntimeError as e:  # a follower already gone (killed): nothing left to tell
            log.warning("the other ranks did not hear the stop: %s", e)

    def _close(self) -> None:
        """After the stop was told (the stream waits for jobs already sent on)."""


# -- split requests: every rank runs every job ---------------------------------------------------
class LeaderWorker(TeamWorker):
    """Rank 0's worker when every rank runs each request: it announces each job to the world."""

    def _send(self, message: dict) -> None:
        _broadcast(self.team, message, 0)

    def _load(self):
        return load_together(self.team, self.load, self.limits)[0]

    def _stop_now(self, job_id: str) -> bool:
        return _agree(self.team, self._cancelled(job_id), 0, None, self.team.world.size)

    def _generate(self, job: dict, settings: GenerateSettings, on_step, on_chunk):
        self._tell({"kind": JOB, "id": job["id"], "request": job["request"]})
        return self.pipe.generate(settings, callback=on_step, decode_callback=on_chunk)

    def _write(self, job_id: str, result, started: float) -> dict[str, float]:
        groups = self.pipe.parallel
        layout = {} if groups is None else dataclasses.asdict(groups.layout)
        extra = {"parallel": {**layout, "world_size": self.team.world.size}}
        return publish_job(self.pipe, job_id, result, started, self.videos_dir, extra=extra)


def follow_requests(team: Team, load: Callable[[], object]) -> int:
    """A rank other than 0 when every rank runs each request: load, then run each job rank 0
    announces (its share: latents only) until rank 0 stops. Returns the jobs it ran."""
    try:
        pipe, limits = load_together(team, load)
    except ValueError as e:  # rank 0's server stays up and says why; nothing to follow
        log.error("rank %d stops: %s", team.world.rank, e)
        return 0
    pipe.limits = limits if limits is not None else pipe.limits
    ran = 0
    while (message := _broadcast(team, None, 0))["kind"] != STOP:
        if message["kind"] != JOB:
            continue

        def on_step(index, num_steps, experts):
            if _agree(team, False, 0, None, team.world.size):
                raise JobCancelled(message["id"])

        try:  # a bad job fails the same way on rank 0, which reports it
            pipe.generate(
                GenerateSettings(**message["request"]), callback=on_step, output="latents"
            )
            ran += 1
        except JobCancelled:
            pass
        except Exception:
            log.error(
                "rank %d, job %s:\n%s", team.world.rank, message["id"], traceback.format_exc()
            )
    return ran


# -- expert groups: a stream --------------------------------------------------------------------
class Relay:
    """One rank's place in the stream of requests through the expert groups: where its messages
    come from (group 0: its first rank's announcement; later groups: the peer in the group
    before) and go to (the peer in the next group)."""

    def __init__(self, stage: Stage, team: Team, store: JobStore | None, videos_dir: Path | None):
        self.stage, self.team = stage, team
        layout, place = stage.groups.layout, stage.groups.place
        self.lead = layout.rank_of(stage.group, 0, 0, place.replica)
        """This group's first rank: it writes the group's progress and decides when it stops."""
        self.size = len(stage.groups.group_ranks)
        self.is_lead = team.world.rank == self.lead
        self.is_last = stage.group == stage.num_groups - 1
        self.store, self.videos_dir = store, videos_dir
        self._outgoing: Outgoing | None = None

    def take(self, message: dict | None = None) -> dict:
        """The next message for this rank (group 0's first rank passes it in)."""
        g = self.stage.group
        if g > 0:
            return recv_message(self.stage.peer(g - 1), self.stage.pipe.device)
        if self.size > 1:
            return _broadcast(self.team, message, self.lead, self.stage.groups.expert_group)
        return message

    def pass_on(self, message: dict) -> None:
        if self.is_last:
            return
        if self._outgoing is not None:
            self._outgoing.wait()  # the previous message's buffers are free only now
        self._outgoing = send_message(message, self.stage.peer(self.stage.group + 1), self.device)

    @property
    def device(self) -> torch.device:
        return self.stage.pipe.device

    def close(self) -> None:
        if self._outgoing is not None:
            self._outgoing.wait()
            self._outgoing = None

    def run(self, message: dict, stop: Callable[[], bool]) -> tuple[str, str]:
        """This group's part of one job: ("sent" | "done" | "cancelled" | "failed", error).

        `stop()` is asked on the group's first rank after every step; its answer is the group's."""
        stage, job_id = self.stage, message["id"]
        t0 = time.time()
        try:
            rs = stage.pipe.resolve(GenerateSettings(**message["request"]))
            plan = stage.pipe.plan(rs)
            state = _start(stage.pipe, rs, plan) if stage.group == 0 else message["state"]
            steps = phase_ranges(plan)[stage.expert]
            self._progress(job_id, plan, steps.start)
            self._denoise(rs, plan, state, stop, job_id)
        except JobCancelled:
            return "cancelled", ""
        except Exception as e:
            log.error("rank %d, job %s:\n%s", self.team.world.rank, job_id, traceback.format_exc())
            return "failed", f"{type(e).__name__}: {e}"
        spans = [*message.get("spans", []), self._span(t0)]
        if not self.is_last:
            self.pass_on({**message, "state": state, "spans": spans})
            return "sent", ""
        if not self.is_lead:
            return "done", ""
        return self._publish(job_id, rs, plan, state, spans, message.get("started", t0))

    def _span(self, t0: float) -> dict:
        """When this rank worked on a job (wall clock), for the video's record."""
        return dict(expert=self.stage.expert, rank=self.team.world.rank, start=t0, end=time.time())

    def _progress(self, job_id: str, plan, step: int) -> None:
        if self.is_lead and step < len(plan.steps):
            experts = list(plan.steps[step].experts)
            self.store.progress(job_id, step=step, experts=experts, phase="denoise")

    def _denoise(self, rs, plan, state: dict, stop, job_id: str) -> None:
        """This group's steps on `state` (in place), agreeing after each whether to stop."""

        def on_step(index: int, num_steps: int, experts) -> None:
            decision = stop() if self.is_lead else False
            group = self.stage.groups.expert_group
            if _agree(self.team, decision, self.lead, group, self.size):
                raise JobCancelled(job_id)
            self._progress(job_id, plan, index + 1)

        _denoise(self.stage, rs, plan, state, callback=on_step)

    def _publish(self, job_id, rs, plan, state, spans, started: float) -> tuple[str, str]:
        """The writer: decode, publish the video, finish the job."""
        if self.store.cancel_requested(job_id):  # asked while the job went from group to group
            return "cancelled", ""
        try:
            self.store.progress(job_id, step=len(plan.steps), experts=None, phase="decode")
            result = _finish(self.stage.pipe, rs, plan, state)
            spans[-1]["end"] = time.time()  # the writer's work on the job includes the decode
            t0 = time.perf_counter() - (time.time() - started)  # the job's start, perf clock
            timings = publish_job(
                self.stage.pipe, job_id, result, t0, self.videos_dir, extra={"stages": spans}
            )
        except Exception as e:
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            return "failed", f"{type(e).__name__}: {e}"
        self.store.finish(job_id, "done", timings={k: round(v, 4) for k, v in timings.items()})
        return "done", ""


class StageWorker(TeamWorker):
    """Rank 0's worker with expert groups: group 0's first rank. It runs the first expert's
    steps of the next job, sends it on to group 1 and takes the next job at once."""

    def __init__(self, store, load, videos_dir, *, limits=None, team: Team):
        super().__init__(store, load, videos_dir, limits=limits, team=team)
        self.relay = None

    def check_plan(self, plan) -> None:
        phase_ranges(plan)  # a group holds one expert: no step may blend two

    def _load(self):
        stage, _ = load_together(self.team, self.load, self.limits)
        self.relay = Relay(stage, self.team, self.store, self.videos_dir)
        return stage.pipe

    def _send(self, message: dict) -> None:
        self.relay.pass_on(self.relay.take(message))

    def _close(self) -> None:
        self.relay.close()

    def _run(self, job: dict) -> None:
        job_id = job["id"]
        if self._cancelled(job_id):
            self.store.finish(job_id, "cancelled")
            return
        try:  # refused here, before the other ranks hear of it
            rs = self.pipe.resolve(GenerateSettings(**job["request"]))
            phase_ranges(self.pipe.plan(rs))
        except ValueError as e:
            self.store.finish(job_id, "failed", error=str(e))
            return
        except Exception:  # a row written by another version, or edited by hand
            self.store.finish(job_id, "failed", error="the stored job cannot be read; resubmit it")
            return
        message = {"kind": JOB, "id": job_id, "request": job["request"], "started": time.time()}
        status, error = self.relay.run(self.relay.take(message), lambda: self._cancelled(job_id))
        self._last_heard = time.monotonic()
        if status == "cancelled" and self._stopping.is_set():
            if not self.store.cancel_requested(job_id):
                self.store.requeue(job_id)  # shutting down: run it again after a restart
                return
        if status in ("cancelled", "failed"):
            self.store.finish(job_id, status, error=error or None)


def follow_stages(
    team: Team, load: Callable[[], Stage], store: JobStore | None, videos_dir: Path | None
) -> int:
    """A rank other than 0 with expert groups: load this rank's `Stage`, then run its part of
    each job that reaches it until the stop message. A group's first rank needs the server's
    `store` (and the last group's its `videos_dir`). Returns the jobs it worked on."""
    try:
        stage, limits = load_together(team, load)
    except ValueError as e:
        log.error("rank %d stops: %s", team.world.rank, e)
        return 0
    stage.pipe.limits = limits if limits is not None else stage.pipe.limits
    relay, worked = Relay(stage, team, store, videos_dir), 0
    while True:
        message = relay.take()
        if message["kind"] != JOB:
            relay.pass_on(message)
            if message["kind"] == STOP:
                break
            continue
        job_id = message["id"]
        status, error = relay.run(message, lambda job_id=job_id: store.cancel_requested(job_id))
        worked += 1
        if relay.is_lead and status in ("cancelled", "failed"):
            store.finish(job_id, status, error=error or None)
    relay.close()
    return worked


def worker_factory(team: Team):
    """What `create_app(worker=...)` builds on rank 0 for this team."""
    cls = StageWorker if team.expert_groups > 1 else LeaderWorker

    def make(store, load, videos_dir, *, limits=None) -> Worker:
        return cls(store, load, videos_dir, limits=limits, team=team)

    return make
