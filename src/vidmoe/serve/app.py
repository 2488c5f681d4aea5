"""The HTTP application: `/v1` job API, server-sent progress events, and the web UI at `/`.

Settings are validated by `resolve_settings`, the CLI's own check, before a job is accepted;
the per-step plan is computed then and returned with the job id. One worker thread runs the
model (see `worker.py`); the event loop only reads the job store. With a token configured,
every `/v1` route needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from vidmoe.sampling.plan import plan_for
from vidmoe.sampling.settings import SAMPLERS, Limits, resolve_settings
from vidmoe.serve.queue import FINISHED, STATUSES, JobStore, QueueFull, is_job_id, new_job_id
from vidmoe.serve.requests import PayloadTooLarge, decode_image, read_body, save_image, to_settings
from vidmoe.serve.worker import Worker

STATIC = Path(__file__).resolve().parent / "static"
DB_NAME = "vidmoe-jobs.sqlite"


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """What `vidmoe serve` was started with."""

    model: str | None = None
    """Checkpoint path or preset; None is the demo model."""
    outputs: Path = Path("outputs/serve")
    """Folder for the job database, videos and uploads."""
    max_queue: int = 64
    """Jobs waiting at most; more get 429."""
    token: str | None = None
    """Bearer token required on every /v1 route, or None."""
    device: str = "auto"
    dtype: str = "auto"
    residency: str = "resident"
    max_upload_bytes: int = 10 * 1024 * 1024
    """Largest accepted request body (images included)."""
    event_interval: float = 0.2
    """Seconds between progress polls of one event stream."""


def create_app(cfg: ServeConfig, *, load=None) -> FastAPI:
    """Build the application; `load()` returns the pipeline (default: `load_pipeline(cfg.model)`)."""
    from vidmoe.loading import load_pipeline, model_config_for

    config = model_config_for(cfg.model)
    limits = Limits.for_model(config, read_files=False)  # no client names a server file
    outputs = Path(cfg.outputs)
    videos, uploads = outputs / "videos", outputs / "uploads"
    store = JobStore(outputs / DB_NAME, max_queue=cfg.max_queue)
    if load is None:

        def load():
            return load_pipeline(
                cfg.model, device=cfg.device, dtype=cfg.dtype, residency=cfg.residency
            )

    worker = Worker(store, load, videos)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        store.recover()
        for folder in (videos, uploads):
            folder.mkdir(parents=True, exist_ok=True)
            for tmp in folder.glob(".*.tmp*"):  # half-written files of a killed run
                tmp.unlink(missing_ok=True)
        worker.start()
        yield
        await run_in_threadpool(worker.stop)

    app = FastAPI(title="vidmoe", version="1", lifespan=lifespan, docs_url="/v1/docs",
                  openapi_url="/v1/openapi.json", redoc_url=None)  # fmt: skip
    app.state.store, app.state.worker, app.state.config = store, worker, config

    def check_token(request: Request) -> None:
        if cfg.token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {cfg.token}".encode()):
            raise HTTPException(401, "missing or wrong token: send Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    api = APIRouter(prefix="/v1", dependencies=[Depends(check_token)])

    def job_or_404(job_id: str) -> dict:
        job = store.get(job_id) if is_job_id(job_id) else None
        if job is None:
            raise HTTPException(404, "no such job")
        return job

    def finished_file(job_id: str, suffix: str) -> Path:
        job = job_or_404(job_id)
        if job["status"] != "done":
            raise HTTPException(409, f"job is {job['status']}; its files exist once it is done")
        return videos / f"{job['id']}{suffix}"  # the id from the database, checked as a UUID

    async def validated(request: Request):
        """(settings, resolved, plan, decoded image or None) or an HTTP error, nothing queued."""
        try:
            fields, image_bytes = await read_body(request, cfg.max_upload_bytes)
            image = None
            if image_bytes is not None:
                image = await run_in_threadpool(decode_image, image_bytes, cfg.max_upload_bytes)
            settings = to_settings(fields, "<upload>" if image is not None else None)
            resolved = resolve_settings(settings, config, limits)
            plan = plan_for(resolved, config)
        except PayloadTooLarge as e:
            raise HTTPException(413, str(e)) from None
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return fields, resolved, plan, image

    @api.post("/plan")
    async def plan_route(request: Request):
        _, resolved, plan, _ = await validated(request)
        return {"plan": plan.to_dict()["steps"], "counts": plan.counts(),
                "expert_names": list(plan.expert_names), "settings": resolved.to_dict(),
                "summary": plan.summary()}  # fmt: skip

    @api.post("/jobs", status_code=202)
    async def submit(request: Request):
        fields, resolved, plan, image = await validated(request)
        job_id = new_job_id()
        if image is not None:
            path = uploads / f"{job_id}.png"
            await run_in_threadpool(save_image, image, path)
            resolved_dict = {**resolved.to_dict(), "image": str(path)}
            fields = {**fields, "image": str(path)}
        else:
            resolved_dict = resolved.to_dict()
        request_fields = dataclasses.asdict(to_settings(fields, fields.get("image")))
        try:
            await run_in_threadpool(store.submit, request_fields, resolved_dict, plan.to_dict(),
                                    job_id=job_id)  # fmt: skip
        except QueueFull as e:
            if image is not None:
                (uploads / f"{job_id}.png").unlink(missing_ok=True)
            return JSONResponse(
                {"detail": str(e)}, 429, headers={"Retry-After": str(e.retry_after)}
            )
        worker.notify()
        return {"id": job_id, "status": "queued", "plan": plan.to_dict()["steps"],
                "counts": plan.counts(), "settings": resolved_dict}  # fmt: skip

    @api.get("/jobs")
    def list_jobs(limit: int = 20, offset: int = 0, status: str | None = None):
        if not 1 <= limit <= 200 or offset < 0:
            raise HTTPException(
                422, f"limit must be in 1..200 and offset >= 0; got {limit}, {offset}"
            )
        if status is not None and status not in STATUSES:
            raise HTTPException(422, f"status must be one of {', '.join(STATUSES)}; got {status!r}")
        jobs, total = store.list_jobs(limit=limit, offset=offset, status=status)
        nxt = offset + len(jobs) if offset + len(jobs) < total else None
        return {
            "jobs": [public(j, with_plan=False) for j in jobs],
            "total": total,
            "next_offset": nxt,
        }

    @api.get("/jobs/{job_id}")
    def get_job(job_id: str):
        return public(job_or_404(job_id))

    @api.delete("/jobs/{job_id}")
    def cancel_job(job_id: str):
        job = job_or_404(job_id)
        if job["status"] in FINISHED:
            raise HTTPException(409, f"job is already {job['status']}")
        status = store.cancel(job["id"])
        if status == "running":
            worker.request_cancel(job["id"])
            return JSONResponse(
                {"id": job["id"], "status": "running", "cancel_requested": True}, 202
            )
        return {"id": job["id"], "status": status}

    @api.get("/jobs/{job_id}/events")
    async def job_events(job_id: str):
        job_or_404(job_id)
        return StreamingResponse(event_stream(store, job_id, cfg.event_interval),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    @api.get("/jobs/{job_id}/video")
    def job_video(job_id: str):
        return FileResponse(finished_file(job_id, ".mp4"), media_type="video/mp4")

    @api.get("/jobs/{job_id}/settings")
    def job_settings(job_id: str):
        return FileResponse(finished_file(job_id, ".mp4.json"), media_type="application/json")

    @api.get("/health")
    def health():
        counts = store.counts()
        status = {"error": "error", "loading": "loading"}.get(worker.state, "ok")
        return {"status": status, "worker": worker.state, "load_error": worker.load_error,
                "model": config.name, "queued": counts["queued"], "running": counts["running"],
                "max_queue": cfg.max_queue}  # fmt: skip

    model_info: dict = {}

    @api.get("/model")
    def model():
        if not model_info:
            model_info.update(describe(config))
        source = worker.pipe.source if worker.pipe is not None else None
        return {**model_info, "source": source}

    app.include_router(api)

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/ui/app.js", include_in_schema=False)
    def app_js():
        return FileResponse(STATIC / "app.js", media_type="text/javascript")

    return app


def public(job: dict, *, with_plan: bool = True) -> dict:
    """The API's view of a job row."""
    out = {
        "id": job["id"], "status": job["status"], "queue_position": job["queue_position"],
        "progress": progress_of(job), "settings": job["settings"],
        "counts": {n: sum(n in s["experts"] for s in job["plan"]["steps"]) for n in job["plan"]["expert_names"]},
        "created": job["created"], "started": job["started"], "finished": job["finished"],
        "timings": job["timings"], "error": job["error"], "attempts": job["attempts"],
        "cancel_requested": job["cancel_requested"],
    }  # fmt: skip
    if job["status"] == "done":
        out["video_url"] = f"/v1/jobs/{job['id']}/video"
        out["settings_url"] = f"/v1/jobs/{job['id']}/settings"
    if with_plan:
        out["plan"] = job["plan"]["steps"]
    return out


def progress_of(job: dict) -> dict:
    """Steps done of all, the expert(s) at work now, and the phase (denoise, decode, write)."""
    return {"step": job["step"], "num_steps": job["num_steps"], "experts": job["experts"],
            "phase": job["phase"] if job["status"] == "running" else None}  # fmt: skip


async def event_stream(store: JobStore, job_id: str, interval: float):
    """Server-sent events: one `progress` event per change, then one named by the final status.

    Every denoising step gets its own `progress` event, with the expert(s) that ran it, even a
    step that started and finished between two polls of the job store: those are sent late (in
    order, before the newer state), so a client never misses which expert did what.
    """
    last, quiet = None, 0.0
    while True:
        job = store.get(job_id)
        view = {"id": job_id, "status": job["status"], "queue_position": job["queue_position"],
                "progress": progress_of(job), "error": job["error"]}  # fmt: skip
        if view != last:
            if last is not None:
                for step in missed_steps(job, view, last):
                    yield f"event: progress\ndata: {json.dumps(step)}\n\n"
            name = job["status"] if job["status"] in FINISHED else "progress"
            yield f"event: {name}\ndata: {json.dumps(view)}\n\n"
            last, quiet = view, 0.0
        if job["status"] in FINISHED:
            return
        if quiet > 15:
            yield ": keep-alive\n\n"
            quiet = 0.0
        await asyncio.sleep(interval)
        quiet += interval


def missed_steps(job: dict, view: dict, last: dict) -> list[dict]:
    """`running` views of the denoising steps that began after the `last` view sent and before
    the job's state now (`view`)."""
    if job["status"] == "queued":
        return []
    p = last["progress"]
    if p["phase"] == "denoise":
        sent = p["step"]  # the step at work in the last view
    else:  # queued: none yet; decode/write: all of them
        sent = -1 if last["status"] == "queued" else p["step"] - 1
    steps = job["plan"]["steps"]
    return [{**view, "status": "running", "queue_position": None, "error": None,
             "progress": {"step": k, "num_steps": job["num_steps"],
                          "experts": steps[k]["experts"], "phase": "denoise"}}
            for k in range(sent + 1, min(job["step"], len(steps)))]  # fmt: skip


def describe(config) -> dict:
    """Experts, parameters (total, active per step), boundary and accepted sizes and frames."""
    from vidmoe.loading import expert_param_counts

    per_expert = expert_param_counts(config)
    moe, t, vae = config.moe, config.transformer, config.vae
    return {
        "name": config.name, "model_type": t.model_type, "text_encoder": config.text_encoder,
        "experts": [{"name": n, "guidance": g} for n, g in zip(moe.expert_names, moe.guidance)],
        "boundaries": list(moe.boundaries),
        "params": {"total": sum(per_expert.values()), "active": max(per_expert.values()),
                   "per_expert": per_expert},
        "sizes": [list(s) for s in config.sizes] or None,
        "size_multiple": config.size_multiple,
        "default_size": list(config.default_size),
        "frames": {"rule": f"{vae.temporal_stride}k+1", "temporal_stride": vae.temporal_stride,
                   "default": config.default_num_frames},
        "fps": config.fps, "samplers": list(SAMPLERS), "default_sampler": config.scheduler.sampler,
        "default_steps": config.scheduler.num_steps, "default_shift": config.scheduler.shift,
        "boundary_modes": ["release", "snr", "steps:N", "a sigma in (0, 1)"],
        "needs_image": t.model_type == "i2v", "accepts_image": t.model_type != "t2v",
    }  # fmt: skip
