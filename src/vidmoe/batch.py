"""Batch generation: many prompts from one file, resumable, over every rank of a torchrun world.

A prompts file is text (one prompt per line; blank lines and `#` comments skipped) or JSONL (one
object per line: `prompt`, any `GenerateSettings` field, an optional output `name`). Each entry is
a `Job` with a fixed index (its place among the file's entries), which names its output
(`0007-a-red-circle.mp4` + `.json`). Every entry is validated up front by `resolve_settings`; a
bad one is reported and the others still run. A job whose mp4 and JSON are both published, match
each other and record the same settings and model is skipped, so a killed batch resumes where it
stopped.

Under torchrun the jobs are dealt out over the replicas of a parallel layout
(`vidmoe.parallel.world.Layout.filling`; index % replicas; a replica is one rank when nothing
splits a video): every rank of a replica runs the replica's jobs together (Ulysses, CFG), and
one rank of it, the writer, decides what is finished and publishes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vidmoe.parallel.world import Groups, World
from vidmoe.sampling.settings import GenerateSettings, ResolvedSettings

SETTING_KEYS = tuple(f.name for f in dataclasses.fields(GenerateSettings))
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,119}$")
STATUSES = ("done", "skipped", "failed")
RECORD_NAME = "batch.jsonl"


@dataclass(frozen=True, kw_only=True)
class Job:
    """One entry of a prompts file."""

    index: int
    """Place among the file's entries (0-based); fixes the output name and the rank."""
    line: int
    """1-based line number in the file, for reports."""
    name: str
    """Output stem: the video is NAME.mp4, its record NAME.mp4.json."""
    settings: GenerateSettings | None
    """The line's settings over the defaults; None when the line could not be read."""
    error: str = ""
    """Why the line is bad (empty for a good one)."""


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What became of one job in this run."""

    index: int
    line: int
    name: str
    status: str
    """'done' (generated now), 'skipped' (already published) or 'failed'."""
    error: str = ""
    seconds: float = 0.0
    rank: int = 0


@dataclass(frozen=True, kw_only=True)
class BatchReport:
    """Every job's outcome, in file order."""

    outcomes: tuple[Outcome, ...]

    def counts(self) -> dict[str, int]:
        return {s: sum(o.status == s for o in self.outcomes) for s in STATUSES}

    @property
    def ok(self) -> bool:
        return not any(o.status == "failed" for o in self.outcomes)

    def summary(self) -> str:
        c = self.counts()
        lines = [f"batch: {c['done']} done, {c['skipped']} skipped, {c['failed']} failed"]
        lines += [f"  line {o.line}: {o.error}" for o in self.outcomes if o.status == "failed"]
        return "\n".join(lines)


def slug(prompt: str, max_len: int = 40) -> str:
    """A file-name-safe stem of a prompt: 'A red circle!' -> 'a-red-circle'."""
    s = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:max_len].strip("-")
    return s or "unconditional"


def read_jobs(path: str | Path, defaults: GenerateSettings | None = None) -> list[Job]:
    """The jobs of a prompts file: JSONL when it ends in .jsonl/.ndjson or its first entry
    starts with '{', else text. A line that cannot be read becomes a Job with `error` set."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the prompts file {path}: {e}") from None
    entries = [
        (n, line.strip())
        for n, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.strip().startswith("#")
    ]
    if not entries:
        raise ValueError(
            f"the prompts file {path} has no prompts (blank lines and # comments are skipped)"
        )
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson") or entries[0][1].startswith("{")
    return parse_jobs(entries, defaults or GenerateSettings(), jsonl=jsonl)


def parse_jobs(
    entries: Iterable[tuple[int, str]], defaults: GenerateSettings, *, jsonl: bool
) -> list[Job]:
    """Jobs from (line number, stripped text) entries; see `read_jobs`."""
    jobs: list[Job] = []
    used: dict[str, int] = {}
    for index, (line, text) in enumerate(entries):
        try:
            fields = _json_fields(text) if jsonl else {"prompt": text}
            name = fields.pop("name", None)
            settings = dataclasses.replace(defaults, **fields)
            name = _check_name(name) if name is not None else f"{index:04d}-{slug(settings.prompt)}"
            if name in used:
                raise ValueError(f"name {name!r} is already used by line {used[name]}")
            used[name] = line
            jobs.append(Job(index=index, line=line, name=name, settings=settings))
        except ValueError as e:
            jobs.append(
                Job(index=index, line=line, name=f"{index:04d}", settings=None, error=str(e))
            )
    return jobs


def _json_fields(text: str) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"a JSONL line must be an object {{...}}; got {type(obj).__name__}")
    if not isinstance(obj.get("prompt"), str):
        raise ValueError(f"a JSONL line needs a string 'prompt'; got {obj.get('prompt')!r}")
    unknown = [k for k in obj if k not in SETTING_KEYS and k != "name"]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; accepted: name, {', '.join(SETTING_KEYS)}")
    return obj


def _check_name(name) -> str:
    if isinstance(name, str) and name.lower().endswith(".mp4"):
        name = name[:-4]
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(
            f"name must be a file stem of letters, digits, '.', '_' or '-' (at most 120, no "
            f"folders); got {name!r}"
        )
    return name


def video_path(out_dir: str | Path, job: Job) -> Path:
    return Path(out_dir) / f"{job.name}.mp4"


def resolve_job(job: Job, resolve: Callable[[GenerateSettings], ResolvedSettings]):
    """(resolved settings, '') of a good job, or (None, why it is bad)."""
    if job.settings is None:
        return None, job.error
    try:
        return resolve(job.settings), ""
    except ValueError as e:
        return None, str(e)


def run_record(
    result,
    source: dict,
    *,
    recipe: str | None = None,
    job: Job | None = None,
    parallel: dict | None = None,
):
    """The JSON record published beside a video: settings, model, plan, trace, timings (and
    the parallel layout that made it, `layout_record`)."""
    record = {
        "settings": result.settings.to_dict(),
        "model": source,
        "plan": result.plan.to_dict(),
        "trace": result.trace,
        "timings": result.timings,
    }
    if recipe:
        record["recipe"] = recipe
    if job is not None:
        record["batch"] = {"index": job.index, "line": job.line, "name": job.name}
    if parallel is not None:
        record["parallel"] = parallel
    return record


def layout_record(world: World, groups: Groups | None) -> dict | None:
    """The "parallel" entry of a record: the layout and the world size (as a single generate
    under torchrun records it); None for one process."""
    if not world.distributed:
        return None
    from vidmoe.parallel.world import Layout

    layout = groups.layout if groups is not None else Layout(replicas=world.size)
    return {**dataclasses.asdict(layout), "world_size": world.size}


@dataclass(frozen=True, kw_only=True)
class Replica:
    """This rank's replica: which jobs it runs, and the one rank that publishes them."""

    index: int
    count: int
    writer: int
    """The global rank that decides what is finished and publishes."""
    ranks: tuple[int, ...]
    """The global ranks of the replica (all of them run each of its jobs)."""
    group: object | None = None
    """The replica's process group (None: the whole world, or one rank)."""

    @classmethod
    def of(cls, world: World, groups: Groups | None, writer: int | None = None) -> Replica:
        """From a layout's `Groups` (None: every rank its own replica); `writer` defaults to
        the replica's first rank."""
        if groups is None:
            return cls(index=world.rank, count=world.size, writer=world.rank, ranks=(world.rank,))
        ranks = tuple(groups.replica_ranks)
        writer = groups.replica_main if writer is None else writer
        p, n = groups.place, groups.layout.replicas
        return cls(index=p.replica, count=n, writer=writer, ranks=ranks, group=groups.replica)

    def owns(self, job: Job) -> bool:
        return job.index % self.count == self.index

    def share(self, world: World, value):
        """The writer's `value`, on every rank of the replica (a collective inside it)."""
        if len(self.ranks) == 1:
            return value
        import torch.distributed as dist

        box = [value if world.rank == self.writer else None]
        dist.broadcast_object_list(box, src=self.writer, group=self.group)
        return box[0]


def pending(replica: Replica, world: World, checked, out_dir: Path, source: dict):
    """(the writer's outcomes of the replica's bad and finished jobs, the set of job indices
    still to generate): the writer looks at the outputs and tells the replica's other ranks.

    Args:
        checked: [(job, resolved settings or None, why it is bad)] of this replica's jobs.
    """
    outcomes, todo = [], []
    if world.rank == replica.writer:
        for job, rs, error in checked:
            if rs is None:
                outcomes.append(outcome(job, "failed", error, 0.0, replica.writer))
            elif is_finished(video_path(out_dir, job), rs, source):
                outcomes.append(outcome(job, "skipped", "", 0.0, replica.writer))
            else:
                todo.append(job.index)
    return outcomes, set(replica.share(world, todo))


def is_finished(path: Path, rs: ResolvedSettings, source: dict) -> bool:
    """True if PATH and PATH.json are a published pair (the sha256 matches) whose record holds
    these settings and this model; a temporary file never counts."""
    from vidmoe.io.video import record_path, video_matches_record

    if not video_matches_record(path):
        return False
    try:
        record = json.loads(record_path(path).read_text())
    except (OSError, ValueError):
        return False
    want = json.loads(json.dumps({"settings": rs.to_dict(), "model": source}, default=str))
    return record.get("settings") == want["settings"] and record.get("model") == want["model"]


def check_jobs(jobs: list[Job], resolve: Callable[[GenerateSettings], ResolvedSettings]):
    """Validate every job up front: [(job, resolved settings or None, why it is bad)]."""
    return [(job, *resolve_job(job, resolve)) for job in jobs]


def generate_batch(
    pipe,
    jobs: list[Job],
    out_dir: str | Path,
    *,
    world: World | None = None,
    groups: Groups | None = None,
    progress: bool = False,
    recipe: str | None = None,
    log: Callable[[str], None] | None = None,
    on_result: Callable | None = None,
) -> BatchReport:
    """Generate every job of this rank's replica into `out_dir` (call on every rank).

    Every job is validated first; rank 0 passes each bad one to `log` (line and reason). Bad
    jobs fail without stopping the others; finished ones are skipped. Under torchrun every rank
    returns the whole report, and rank 0 writes it to OUT_DIR/batch.jsonl.

    Args:
        world: this process (default: one process); every rank is then its own replica.
        groups: a layout's groups (`pipe.set_parallel(groups)` already called when a replica
            has several ranks): jobs are dealt out over its replicas (index % replicas), and
            each replica's first rank publishes; `world` is then `groups.world`.
        on_result: called on the publishing rank as on_result(job, GenerationResult).
    Returns:
        A `BatchReport` of every job, in file order.
    """
    world = groups.world if groups is not None else world or World()
    replica = Replica.of(world, groups)
    checked = check_jobs(jobs, pipe.resolve)
    if log is not None and world.is_main:
        for job, _, error in checked:
            if error:
                log(f"line {job.line}: {error}")
    mine = [c for c in checked if replica.owns(c[0])]
    out_dir = Path(out_dir)
    outcomes, todo = pending(replica, world, mine, out_dir, pipe.source)
    parallel = layout_record(world, groups)
    run = [job for job, _, _ in mine if job.index in todo]
    for job in progress_bar(run, progress, world):
        t0 = time.perf_counter()
        error = _run_job(
            pipe, job, out_dir, world.rank == replica.writer, on_result, recipe, parallel
        )
        if world.rank == replica.writer:
            status = "failed" if error else "done"
            outcomes.append(outcome(job, status, error, time.perf_counter() - t0, world.rank))
    return finish_batch(outcomes, out_dir, world)


def _run_job(pipe, job, out_dir: Path, writes: bool, on_result, recipe, parallel) -> str:
    """Generate one job (every rank of the replica); the writer publishes. '' or the error."""
    from vidmoe.io.video import publish_video

    try:
        result = pipe.generate(job.settings, output="frames" if writes else "latents")
        if writes:
            if on_result is not None:
                on_result(job, result)
            record = run_record(result, pipe.source, recipe=recipe, job=job, parallel=parallel)
            publish_video(result.frames, record, video_path(out_dir, job), fps=pipe.config.fps)
        return ""
    except Exception as e:  # one request's failure must not stop the batch
        return f"{type(e).__name__}: {e}"


def outcome(job: Job, status: str, error: str, seconds: float, rank: int) -> Outcome:
    error = " ".join(error.split())
    return Outcome(
        index=job.index,
        line=job.line,
        name=job.name,
        status=status,
        error=error,
        seconds=round(seconds, 3),
        rank=rank,
    )


def finish_batch(outcomes: list[Outcome], out_dir: str | Path, world: World) -> BatchReport:
    """Gather every rank's outcomes (a collective under torchrun; each job's outcome is held by
    one rank, its replica's writer); rank 0 writes batch.jsonl."""
    if world.distributed:
        import torch.distributed as dist

        gathered: list = [None] * world.size
        dist.all_gather_object(gathered, outcomes)
        outcomes = [o for part in gathered for o in part]
    report = BatchReport(outcomes=tuple(sorted(outcomes, key=lambda o: o.index)))
    if world.is_main:
        from vidmoe.io.atomic import write_text_atomic

        text = "".join(json.dumps(dataclasses.asdict(o)) + "\n" for o in report.outcomes)
        write_text_atomic(text, Path(out_dir) / RECORD_NAME)
    return report


def progress_bar(items: list, enabled: bool, world: World):
    """`items`, with a tqdm bar per rank when `enabled`."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    desc = f"batch rank {world.rank}" if world.distributed else "batch"
    return tqdm(items, desc=desc, unit="video", position=world.rank)
