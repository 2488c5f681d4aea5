"""The persistent job queue: one SQLite table (WAL) in the outputs folder.

A job is `queued`, `running`, `done`, `failed` or `cancelled`. Accepted jobs survive a crash:
on start, `recover()` puts a job that was `running` back in the queue (it runs again from the
start, in its original place) unless it was interrupted `max_attempts` times already: then it
is `failed`, so a job that kills the server cannot block the queue. Finished jobs stay finished.
Each thread gets its own connection, so readers never wait on the worker's progress writes.
JSON is stored strictly (no NaN or Infinity) and read back defensively: a row that cannot be
read becomes a job with `None` fields, never an error for the whole list.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    settings TEXT NOT NULL,
    plan TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    step INTEGER NOT NULL DEFAULT 0,
    num_steps INTEGER NOT NULL,
    experts TEXT,
    phase TEXT,
    timings TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""


class QueueFull(Exception):
    """The queue holds `max_queue` jobs already."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class JobStore:
    """Jobs in an SQLite file: submit, claim, progress, finish, cancel, list."""

    def __init__(self, path: str | Path, *, max_queue: int = 64, max_attempts: int = 2):
        if max_queue < 1 or max_attempts < 1:
            raise ValueError(
                f"max_queue and max_attempts must be >= 1; got {max_queue}, {max_attempts}"
            )
        self.path, self.max_queue, self.max_attempts = Path(path), max_queue, max_attempts
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._create(self._db())

    @staticmethod
    def _create(db: sqlite3.Connection, tries: int = 200) -> None:
        """WAL mode and the schema; another process creating the same file at the same moment
        (a torchrun server's rank 0 and its writer) holds the lock briefly: wait for it."""
        for attempt in range(tries):
            try:
                if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or attempt == tries - 1:
                    raise
                time.sleep(0.05)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def _write(self, sql: str, args: tuple = ()) -> int:
        with self._write_lock:
            return self._db().execute(sql, args).rowcount

    # -- lifecycle ---------------------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """After a restart: a job left `running` is queued again (or cancelled, if asked, or
        failed, if it was interrupted `max_attempts` times)."""
        cancelled = self._write(
            "UPDATE jobs SET status='cancelled', finished=?, phase=NULL "
            "WHERE status='running' AND cancel_requested=1",
            (time.time(),),
        )
        error = (
            f"the server stopped during each of this job's {self.max_attempts} runs; "
            "it is not run again (resubmit it, perhaps smaller)"
        )
        failed = self._write(
            "UPDATE jobs SET status='failed', finished=?, phase=NULL, error=? "
            "WHERE status='running' AND attempts>=?",
            (time.time(), error, self.max_attempts),
        )
        requeued = self._write(
            "UPDATE jobs SET status='queued', step=0, phase=NULL, experts=NULL, started=NULL "
            "WHERE status='running'"
        )
        return {"requeued": requeued, "cancelled": cancelled, "failed": failed}

    def submit(
        self, request: dict, settings: dict, plan: dict, *, job_id: str | None = None
    ) -> str:
        """Queue a validated job; raise `QueueFull` when `max_queue` jobs are waiting."""
        job_id = job_id or new_job_id()
        with self._write_lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                (waiting,) = db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE status='queued'"
                ).fetchone()
                if waiting >= self.max_queue:
                    raise QueueFull(self._retry_after(db))
                db.execute(
                    "INSERT INTO jobs (id, status, request, settings, plan, created, num_steps) "
                    "VALUES (?, 'queued', ?, ?, ?, ?, ?)",
                    (
                        job_id,
                        _dumps(request),
                        _dumps(settings),
                        _dumps(plan),
                        time.time(),
                        len(plan["steps"]),
                    ),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return job_id

    def _retry_after(self, db: sqlite3.Connection) -> int:
        rows = db.execute(
            "SELECT finished - started FROM jobs WHERE status='done' ORDER BY finished DESC LIMIT 20"
        ).fetchall()
        mean = sum(r[0] for r in rows) / len(rows) if rows else 10.0
        return max(1, round(mean))

    def claim_next(self) -> dict | None:
        """Mark the oldest queued job `running` and return it (None when the queue is empty)."""
        with self._write_lock:
            db = self._db()
            row = db.execute(
                "SELECT id FROM jobs WHERE status='queued' ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET status='running', started=?, attempts=attempts+1, step=0 "
                "WHERE id=? AND status='queued'",
                (time.time(), row["id"]),
            )
        return self.get(row["id"])

    def progress(self, job_id: str, *, step: int, experts: list[str] | None, phase: str) -> None:
        self._write(
            "UPDATE jobs SET step=?, experts=?, phase=? WHERE id=? AND status='running'",
            (step, _dumps(experts) if experts is not None else None, phase, job_id),
        )

    def finish(
        self, job_id: str, status: str, *, timings: dict | None = None, error: str | None = None
    ) -> bool:
        """Move a running job to done/failed/cancelled; False if it was not running."""
        assert status in FINISHED, status
        return bool(
            self._write(
                "UPDATE jobs SET status=?, finished=?, timings=?, error=?, phase=NULL "
                "WHERE id=? AND status='running'",
                (status, time.time(), _dumps(timings or {}), error, job_id),
            )
        )

    def requeue(self, job_id: str) -> None:
        """Queue a running job again, its run not counted (the server is shutting down)."""
        self._write(
            "UPDATE jobs SET status='queued', step=0, phase=NULL, experts=NULL, "
            "attempts=MAX(attempts-1, 0) WHERE id=? AND status='running'",
            (job_id,),
        )

    def cancel(self, job_id: str) -> str | None:
        """Cancel a queued job now, or flag a running one; returns the resulting status."""
        with self._write_lock:
            db = self._db()
            n = db.execute(
                "UPDATE jobs SET status='cancelled', finished=? WHERE id=? AND status='queued'",
                (time.time(), job_id),
            ).rowcount
            if not n:
                db.execute(
                    "UPDATE jobs SET cancel_requested=1 WHERE id=? AND status='running'", (job_id,)
                )
        job = self.get(job_id)
        return None if job is None else job["status"]

    # -- reads -------------------------------------------------------------------------------
    def get(self, job_id: str) -> dict | None:
        row = self._db().execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            return None
        job = _decode(row)
        if job["status"] == "queued":
            (ahead,) = (
                self._db()
                .execute("SELECT COUNT(*) FROM jobs WHERE status='queued' AND seq<?", (row["seq"],))
                .fetchone()
            )
            job["queue_position"] = ahead + 1
        return job

    def cancel_requested(self, job_id: str) -> bool:
        row = (
            self._db().execute("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,)).fetchone()
        )
        return bool(row and row[0])

    def list_jobs(
        self, *, limit: int = 20, offset: int = 0, status: str | None = None
    ) -> tuple[list[dict], int]:
        """Jobs newest first, and the total count."""
        where, args = ("WHERE status=?", (status,)) if status else ("", ())
        db = self._db()
        (total,) = db.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()
        rows = db.execute(
            f"SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?", (*args, limit, offset)
        ).fetchall()
        return [_decode(r) for r in rows], total

    def counts(self) -> dict[str, int]:
        rows = self._db().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {s: 0 for s in STATUSES} | {r[0]: r[1] for r in rows}


def new_job_id() -> str:
    return str(uuid.uuid4())


def is_job_id(value: str) -> bool:
    """True for the canonical form of a UUID (the only ids this server hands out)."""
    try:
        return str(uuid.UUID(value)) == value
    except (ValueError, AttributeError, TypeError):
        return False


def _dumps(value) -> str:
    """Strict JSON: a non-finite number raises ValueError instead of writing `NaN`."""
    return json.dumps(value, allow_nan=False)


def _loads(text: str | None):
    """Stored JSON, or None when the row holds something unreadable."""
    try:
        return None if text is None else json.loads(text)
    except (ValueError, TypeError, RecursionError):
        return None


def _decode(row: sqlite3.Row) -> dict:
    job = dict(row)
    for key in ("request", "settings", "plan", "timings", "experts"):
        job[key] = _loads(job[key])
    job["cancel_requested"] = bool(job["cancel_requested"])
    job["queue_position"] = None
    return job
