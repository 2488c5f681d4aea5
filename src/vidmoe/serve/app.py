"""The HTTP application: `create_app` builds the server's state and mounts the routes.

The routes (`routes.py`) are module-level functions reading `app.state.serve`; who may call
them is `guard.py`'s (token, Host, Origin); what a request may hold is `requests.py`'s. One
worker thread runs the model (`worker.py`); the event loop only reads the job store.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import anyio
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from vidmoe.sampling.settings import Limits
from vidmoe.serve.queue import JobStore
from vidmoe.serve.routes import api, pages
from vidmoe.serve.state import ServeConfig, ServeState
from vidmoe.serve.worker import Worker

__all__ = ["DB_NAME", "ServeConfig", "create_app"]

DB_NAME = "vidmoe-jobs.sqlite"


def create_app(cfg: ServeConfig, *, load=None, worker=Worker) -> FastAPI:
    """Build the application; `load()` returns the pipeline (default: `load_pipeline(cfg.model)`),
    `worker(store, load, videos, limits=...)` the thread that runs it (under torchrun: one
    from `serve/distributed.py`)."""
    from vidmoe.loading import load_pipeline, model_config_for

    outputs = Path(cfg.outputs)
    if outputs.exists() and not outputs.is_dir():
        raise ValueError(f"--outputs must be a folder; {outputs} is a file: name a folder")
    config = model_config_for(cfg.model)
    store = JobStore(outputs / DB_NAME, max_queue=cfg.max_queue, max_attempts=cfg.max_attempts)
    if load is None:
        load = functools.partial(
            load_pipeline,
            cfg.model,
            device=cfg.device,
            dtype=cfg.dtype,
            residency=cfg.residency,
            attention=cfg.attention,
            compile=cfg.compile,
        )
    videos = outputs / "videos"
    limits = Limits.for_model(config, read_files=False, **cfg.limit_overrides())
    state = ServeState(
        cfg=cfg,
        config=config,
        limits=limits,
        store=store,
        worker=worker(store, load, videos, limits=limits),
        videos=videos,
        uploads=outputs / "uploads",
    )
    app = FastAPI(
        title="vidmoe",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        openapi_url=None,
        redoc_url=None,
    )
    app.state.serve, app.state.config = state, config
    app.include_router(api)
    app.include_router(pages)
    return app


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    """Recover the queue after a crash, clear half-written files, run the worker."""
    s: ServeState = app.state.serve
    app.state.check_limiter = anyio.CapacityLimiter(1)  # see routes.validated
    s.store.recover()
    for folder in (s.videos, s.uploads):
        folder.mkdir(parents=True, exist_ok=True)
        for tmp in folder.glob(".*.tmp*"):  # half-written files of a killed run
            tmp.unlink(missing_ok=True)
    s.worker.start()
    yield
    await run_in_threadpool(s.worker.stop)
