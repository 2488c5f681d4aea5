"""What the API shows of a job: its public view, its progress, its event stream, and the
model's description.

Rendering is defensive: a stored value that JSON cannot carry (a NaN written by an older
version, a row edited by hand) becomes null, and a row that cannot be rendered at all is shown
by its id and status only, so one job can never make the list or its own page answer 500.
"""

from __future__ import annotations

import asyncio
import json
import math

from vidmoe.sampling.settings import SAMPLERS
from vidmoe.serve.queue import FINISHED, JobStore


def finite(value):
    """`value` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def safe_public(job: dict, *, with_plan: bool = True) -> dict:
    """`public(job)`, or the id and status alone when the stored row cannot be rendered."""
    try:
        view = finite(public(job, with_plan=with_plan))
        json.dumps(view, allow_nan=False)
        return view
    except (TypeError, KeyError, ValueError, AttributeError):
        return {
            "id": job.get("id"),
            "status": job.get("status"),
            "error": job.get("error") or "the stored job cannot be read",
        }


def public(job: dict, *, with_plan: bool = True) -> dict:
    """The API's view of a job row."""
    plan = job["plan"] or {"steps": [], "expert_names": []}
    out = {
        "id": job["id"],
        "status": job["status"],
        "queue_position": job["queue_position"],
        "progress": progress_of(job),
        "settings": job["settings"],
        "counts": {n: sum(n in s["experts"] for s in plan["steps"]) for n in plan["expert_names"]},
        "created": job["created"],
        "started": job["started"],
        "finished": job["finished"],
        "timings": job["timings"],
        "error": job["error"],
        "attempts": job["attempts"],
        "cancel_requested": job["cancel_requested"],
    }
    if job["status"] == "done":
        out["video_url"] = f"/v1/jobs/{job['id']}/video"
        out["settings_url"] = f"/v1/jobs/{job['id']}/settings"
    if with_plan:
        out["plan"] = plan["steps"]
    return out


def progress_of(job: dict) -> dict:
    """Steps done of all, the expert(s) at work now, and the phase (denoise, decode, write)."""
    return {
        "step": job["step"],
        "num_steps": job["num_steps"],
        "experts": job["experts"],
        "phase": job["phase"] if job["status"] == "running" else None,
    }


async def event_stream(store: JobStore, job_id: str, interval: float):
    """Server-sent events: one `progress` event per change, then one named by the final status.

    Every denoising step gets its own `progress` event, with the expert(s) that ran it, even a
    step that started and finished between two polls of the job store: those are sent late (in
    order, before the newer state), so a client never misses which expert did what.
    """
    last, quiet = None, 0.0
    while True:
        job = store.get(job_id)
        view = finite(
            {
                "id": job_id,
                "status": job["status"],
                "queue_position": job["queue_position"],
                "progress": progress_of(job),
                "error": job["error"],
            }
        )
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
    steps = job["plan"].get("steps", []) if isinstance(job["plan"], dict) else []
    return [
        {
            **view,
            "status": "running",
            "queue_position": None,
            "error": None,
            "progress": {
                "step": k,
                "num_steps": job["num_steps"],
                "experts": steps[k]["experts"],
                "phase": "denoise",
            },
        }
        for k in range(sent + 1, min(job["step"], len(steps)))
    ]


def describe(config) -> dict:
    """Experts, parameters (total, active per step), boundary and accepted sizes and frames."""
    from vidmoe.loading import expert_param_counts

    per_expert = expert_param_counts(config)
    moe, t, vae = config.moe, config.transformer, config.vae
    return {
        "name": config.name,
        "model_type": t.model_type,
        "text_encoder": config.text_encoder,
        "experts": [{"name": n, "guidance": g} for n, g in zip(moe.expert_names, moe.guidance)],
        "boundaries": list(moe.boundaries),
        "params": {
            "total": sum(per_expert.values()),
            "active": max(per_expert.values()),
            "per_expert": per_expert,
        },
        "sizes": [list(s) for s in config.sizes] or None,
        "size_multiple": config.size_multiple,
        "default_size": list(config.default_size),
        "frames": {
            "rule": f"{vae.temporal_stride}k+1",
            "temporal_stride": vae.temporal_stride,
            "default": config.default_num_frames,
        },
        "fps": config.fps,
        "samplers": list(SAMPLERS),
        "default_sampler": config.scheduler.sampler,
        "default_steps": config.scheduler.num_steps,
        "default_shift": config.scheduler.shift,
        "boundary_modes": ["release", "snr", "steps:N", "a sigma in (0, 1)"],
        "needs_image": t.model_type == "i2v",
        "accepts_image": t.model_type != "t2v",
    }
