"""The routes: the `/v1` job API and the UI page, each a module-level function reading the
application's `ServeState` (`app.state.serve`).

Settings are validated by `resolve_settings`, the CLI's own check, then against the server's
limits, before a job is accepted; the per-step plan is computed then and returned with the job
id. Parsing, validation and planning run in the thread pool, never on the event loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from vidmoe.planner import gb, predict
from vidmoe.sampling.plan import Plan, plan_for
from vidmoe.sampling.settings import ResolvedSettings, resolve_settings
from vidmoe.serve.guard import guard_api, guard_page
from vidmoe.serve.queue import FINISHED, STATUSES, QueueFull, is_job_id, new_job_id
from vidmoe.serve.requests import (
    PayloadTooLarge,
    UnsupportedMediaType,
    decode_image,
    read_body,
    save_image,
    to_settings,
)
from vidmoe.serve.state import ServeState, serve_state
from vidmoe.serve.views import describe, event_stream, safe_public

STATIC = Path(__file__).resolve().parent / "static"
MAX_OFFSET = 2**62
State = Annotated[ServeState, Depends(serve_state)]

api = APIRouter(prefix="/v1", dependencies=[Depends(guard_api)])
pages = APIRouter(dependencies=[Depends(guard_page)])


@dataclass(frozen=True, kw_only=True)
class Checked:
    """A request that passed every check: its fields, settings, plan and decoded image."""

    fields: dict
    resolved: ResolvedSettings
    plan: Plan
    image: object | None
    """A PIL image, or None."""


def check_request(s: ServeState, fields: dict, image_bytes: bytes | None) -> Checked:
    """Decode the image, validate the settings and plan them (blocking: run in a thread)."""
    image = None
    if image_bytes is not None:
        image = decode_image(image_bytes, s.cfg.max_upload_bytes)
    settings = to_settings(fields, "<upload>" if image is not None else None)
    # the upload is saved only once it is queued: its size comes from the decoded image
    size = None if image is None else image.size
    resolved = resolve_settings(settings, s.config, s.limits, image_size=size)
    pipe = getattr(s.worker, "pipe", None)  # loaded: the job's record shows the encoded prompt
    if pipe is not None:
        resolved = pipe.rewritten(resolved)
    plan = plan_for(resolved, s.config)
    s.worker.check_plan(plan)
    memory = predict(
        s.config, s.memory_request(resolved.width, resolved.height, resolved.num_frames)
    )
    if not s.memory_budget.fits(memory):  # refuse what would kill the server, before queueing
        raise ValueError(
            f"this job needs about host {gb(memory.host_peak_bytes)}, device "
            f"{gb(memory.device_peak_bytes)} (predicted); this server has "
            f"{s.memory_budget.describe()}: use a smaller size or fewer frames"
        )
    return Checked(fields=fields, resolved=resolved, plan=plan, image=image)


async def validated(request: Request, s: ServeState) -> Checked:
    """The checked request, or an HTTP error (413, 415, 422) with nothing queued."""
    try:
        fields, image_bytes = await read_body(request, s.cfg.max_upload_bytes)
        limiter = request.app.state.check_limiter  # one request checked at a time
        return await anyio.to_thread.run_sync(
            check_request, s, fields, image_bytes, limiter=limiter
        )
    except PayloadTooLarge as e:
        raise HTTPException(413, str(e)) from None
    except UnsupportedMediaType as e:
        raise HTTPException(415, str(e)) from None
    except ValueError as e:
        raise HTTPException(422, str(e)) from None


def job_or_404(s: ServeState, job_id: str) -> dict:
    job = s.store.get(job_id) if is_job_id(job_id) else None
    if job is None:
        raise HTTPException(404, "no such job")
    return job


def finished_file(s: ServeState, job_id: str, suffix: str) -> Path:
    job = job_or_404(s, job_id)
    if job["status"] != "done":
        raise HTTPException(409, f"job is {job['status']}; its files exist once it is done")
    return s.videos / f"{job['id']}{suffix}"  # the id from the database, checked as a UUID


@api.post("/plan")
async def plan_route(request: Request, s: State):
    c = await validated(request, s)
    return {
        "plan": c.plan.to_dict()["steps"],
        "counts": c.plan.counts(),
        "expert_names": list(c.plan.expert_names),
        "settings": c.resolved.to_dict(),
        "summary": c.plan.summary(),
    }


@api.post("/jobs", status_code=202)
async def submit(request: Request, s: State):
    if s.worker.state == "error":
        raise HTTPException(
            503,
            f"the model failed to load ({s.worker.load_error}); this "
            "server cannot run jobs: restart it with a model that loads",
        )
    c = await validated(request, s)
    job_id, fields, settings = new_job_id(), c.fields, c.resolved.to_dict()
    upload = s.uploads / f"{job_id}.png"
    if c.image is not None:
        await run_in_threadpool(save_image, c.image, upload)
        fields, settings = {**fields, "image": str(upload)}, {**settings, "image": str(upload)}
    request_fields = dataclasses.asdict(to_settings(fields, fields.get("image")))
    try:
        await run_in_threadpool(
            s.store.submit, request_fields, settings, c.plan.to_dict(), job_id=job_id
        )
    except (QueueFull, ValueError) as e:
        upload.unlink(missing_ok=True)
        if isinstance(e, ValueError):  # a value JSON cannot store strictly
            raise HTTPException(422, str(e)) from None
        return JSONResponse({"detail": str(e)}, 429, headers={"Retry-After": str(e.retry_after)})
    s.worker.notify()
    return {
        "id": job_id,
        "status": "queued",
        "plan": c.plan.to_dict()["steps"],
        "counts": c.plan.counts(),
        "settings": settings,
    }


@api.get("/jobs")
def list_jobs(s: State, limit: int = 20, offset: int = 0, status: str | None = None):
    if not 1 <= limit <= 200 or not 0 <= offset <= MAX_OFFSET:
        raise HTTPException(
            422, f"limit must be in 1..200 and offset in 0..2**62; got {limit}, {offset}"
        )
    if status is not None and status not in STATUSES:
        raise HTTPException(422, f"status must be one of {', '.join(STATUSES)}; got {status!r}")
    jobs, total = s.store.list_jobs(limit=limit, offset=offset, status=status)
    nxt = offset + len(jobs) if offset + len(jobs) < total else None
    return {
        "jobs": [safe_public(j, with_plan=False) for j in jobs],
        "total": total,
        "next_offset": nxt,
    }


@api.get("/jobs/{job_id}")
def get_job(job_id: str, s: State):
    return safe_public(job_or_404(s, job_id))


@api.delete("/jobs/{job_id}")
def cancel_job(job_id: str, s: State):
    job = job_or_404(s, job_id)
    if job["status"] in FINISHED:
        raise HTTPException(409, f"job is already {job['status']}")
    status = s.store.cancel(job["id"])
    if status == "running":
        s.worker.request_cancel(job["id"])
        return JSONResponse({"id": job["id"], "status": "running", "cancel_requested": True}, 202)
    return {"id": job["id"], "status": status}


@api.get("/jobs/{job_id}/events")
async def job_events(job_id: str, s: State):
    job_or_404(s, job_id)
    return StreamingResponse(
        event_stream(s.store, job_id, s.cfg.event_interval),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@api.get("/jobs/{job_id}/video")
def job_video(job_id: str, s: State):
    return FileResponse(finished_file(s, job_id, ".mp4"), media_type="video/mp4")


@api.get("/jobs/{job_id}/settings")
def job_settings(job_id: str, s: State):
    return FileResponse(finished_file(s, job_id, ".mp4.json"), media_type="application/json")


@api.get("/health")
async def health(s: State):  # on the event loop: one small read, no wait for a thread
    counts = s.store.counts()
    status = {"error": "error", "loading": "loading"}.get(s.worker.state, "ok")
    return {
        "status": status,
        "worker": s.worker.state,
        "load_error": s.worker.load_error,
        "model": s.config.name,
        "queued": counts["queued"],
        "running": counts["running"],
        "max_queue": s.cfg.max_queue,
    }


@api.get("/model")
def model(s: State):
    if not s.model_info:
        s.model_info.update(describe(s.config))
    source = s.worker.pipe.source if s.worker.pipe is not None else None
    limits = {
        "max_steps": s.limits.max_steps,
        "max_num_frames": s.limits.max_num_frames,
        "max_pixels": s.limits.max_pixels,
        "max_upload_bytes": s.cfg.max_upload_bytes,
    }
    return {**s.model_info, "source": source, "limits": limits}


@api.get("/openapi.json", include_in_schema=False)
def openapi(request: Request):
    return JSONResponse(request.app.openapi())


@api.get("/docs", include_in_schema=False)
def docs():
    return get_swagger_ui_html(openapi_url="/v1/openapi.json", title="vidmoe API")


@pages.get("/", include_in_schema=False)
def index():
    return FileResponse(STATIC / "index.html", media_type="text/html")


@pages.get("/ui/app.js", include_in_schema=False)
def app_js():
    return FileResponse(STATIC / "app.js", media_type="text/javascript")
