"""`vidmoe serve` under torchrun, on real gloo processes: rank 0's queue feeds every rank (CFG
split, a cancel agreed by all) or streams through two expert groups (both busy with different
requests at once, through the real HTTP app); each video is the single-process one; the
launches that cannot work are refused in one line."""

import json
import os
import re
import time

import pytest
import torch

from tests.parallel.spawn import run_ranks
from tests.parallel.tiny import tiny_pipeline
from vidmoe.io.video import publish_video
from vidmoe.parallel.pipelined import make_stage
from vidmoe.parallel.world import Groups, Layout, World
from vidmoe.sampling.settings import GenerateSettings
from vidmoe.serve.distributed import LeaderWorker, Team, follow_requests, follow_stages
from vidmoe.serve.queue import JobStore

SMALL = dict(width=32, height=32, num_frames=5, num_steps=4, boundary="steps:2")
REQUESTS = [
    dict(prompt="a red circle", seed=1, **SMALL),
    dict(prompt="cancelled after its first step", seed=2, **SMALL),
    dict(prompt="a blue star", seed=3, sampler="dpm++", **SMALL),
]

LONG_HIGH = dict(width=32, height=32, num_frames=5, num_steps=12, boundary="steps:10")
"""Ten high-noise steps (~0.2 s on group 0): group 1 takes request i well within group 0's work
on request i + 1, even on a loaded machine."""
STREAM = [dict(prompt=f"request {i}", seed=i, **LONG_HIGH) for i in range(3)]
STREAM[1]["sampler"] = "dpm++"
LONG_LOW = dict(width=32, height=32, num_frames=5, num_steps=60, boundary="steps:2")
"""Fifty-eight low-noise steps: time to cancel the job while group 1 runs it."""


class RecordingLeader(LeaderWorker):
    """Rank 0's worker, keeping each job's latents; job 2 is cancelled through the store at
    its first step, as `DELETE /v1/jobs/ID` does."""

    latents: dict

    def _stop_now(self, job_id: str) -> bool:
        if job_id == "job-1":
            self.store.cancel(job_id)
        return super()._stop_now(job_id)

    def _generate(self, job, settings, on_step, on_chunk):
        result = super()._generate(job, settings, on_step, on_chunk)
        self.latents[job["id"]] = result.latents
        return result


def _cfg_split(rank, size, out):
    world = World(rank=rank, size=size, local_rank=rank)
    team = Team(world=world, device=torch.device("cpu"), heartbeat_s=0.2)

    def load():
        pipe = tiny_pipeline()
        pipe.set_parallel(Groups(Layout(cfg=2), world))
        return pipe

    if rank != 0:
        return {"ran": follow_requests(team, load)}
    store = JobStore(out / "jobs.sqlite")
    for i, request in enumerate(REQUESTS):
        store.submit(request, {}, {"steps": [{"experts": ["high_noise"]}] * 4}, job_id=f"job-{i}")
    worker = RecordingLeader(store, load, out / "videos", team=team)
    worker.latents = {}
    worker.start()
    deadline = time.monotonic() + 60
    while store.counts()["queued"] + store.counts()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # idle: heartbeats reach rank 1
    worker.stop(timeout=30)
    jobs = {f"job-{i}": store.get(f"job-{i}") for i in range(3)}
    return {"jobs": jobs, "latents": worker.latents, "state": worker.state}


def test_cfg_split_server_runs_each_job_on_both_ranks_and_agrees_on_a_cancel(tmp_path):
    first, second = run_ranks(_cfg_split, 2, tmp_path / "spawn", tmp_path / "out", timeout=90)
    jobs = first["jobs"]
    assert [jobs[f"job-{i}"]["status"] for i in range(3)] == ["done", "cancelled", "done"]
    assert jobs["job-1"]["step"] == 0  # stopped at its first step on both ranks
    assert second["ran"] == 2 and first["state"] == "stopped"  # rank 1 left on the stop message
    assert sorted(p.name for p in (tmp_path / "out" / "videos").glob("*.mp4")) == [
        "job-0.mp4",
        "job-2.mp4",
    ]
    record = json.loads((tmp_path / "out" / "videos" / "job-0.mp4.json").read_text())
    assert record["parallel"] == {
        "ulysses": 1,
        "cfg": 2,
        "expert_groups": 1,
        "replicas": 1,
        "world_size": 2,
    }
    torch.set_num_threads(1)
    pipe = tiny_pipeline()
    for i in (0, 2):
        expected = pipe.generate(GenerateSettings(**REQUESTS[i]), output="latents").latents
        got = first["latents"][f"job-{i}"]
        assert (got - expected).norm() <= 1e-4 * expected.norm()


def _stream(rank, size, out, layout):
    from fastapi.testclient import TestClient

    from vidmoe.serve.app import DB_NAME, ServeConfig, create_app
    from vidmoe.serve.distributed import worker_factory

    world = World(rank=rank, size=size, local_rank=rank)
    team = Team(world=world, device=torch.device("cpu"), expert_groups=2, heartbeat_s=0.2)

    def load():
        return make_stage(tiny_pipeline(), Groups(layout, world))

    if rank != 0:
        lead = rank in (layout.rank_of(1, 0, 0),)
        store = JobStore(out / DB_NAME) if lead else None
        return {"worked": follow_stages(team, load, store, out / "videos")}
    cfg = ServeConfig(model="tiny-t2v", outputs=out, device="cpu")
    application = create_app(cfg, load=load, worker=worker_factory(team))
    with TestClient(application, base_url="http://127.0.0.1:7860") as c:
        ids = [c.post("/v1/jobs", json=r).json()["id"] for r in STREAM]  # while loading
        ids.append(c.post("/v1/jobs", json={"prompt": "cancelled", **LONG_LOW}).json()["id"])
        deadline = time.monotonic() + 60
        while (job := c.get(f"/v1/jobs/{ids[-1]}").json())["progress"]["step"] < 4:
            assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
            time.sleep(0.01)
        cancel = c.delete(f"/v1/jobs/{ids[-1]}").json()  # group 1 is on its steps
        while time.monotonic() < deadline:
            jobs = [c.get(f"/v1/jobs/{i}").json() for i in ids]
            if all(j["status"] in ("done", "failed", "cancelled") for j in jobs):
                break
            time.sleep(0.1)
        time.sleep(0.5)  # idle: heartbeats reach the other ranks
    held = list(application.state.serve.worker.pipe.experts)
    return {
        "jobs": jobs,
        "held": held,
        "cancel": cancel,
    }


FOUR = pytest.mark.skipif(
    not os.environ.get("VIDMOE_TEST_4_RANKS"),
    reason="4 processes take ~40 s on 2 busy cores: set VIDMOE_TEST_4_RANKS=1 to run it",
)


@pytest.mark.parametrize(
    "size, layout",
    [(2, Layout(expert_groups=2)), pytest.param(4, Layout(expert_groups=2, cfg=2), marks=FOUR)],
)
def test_expert_groups_stream_the_queue_with_both_groups_busy(tmp_path, size, layout):
    out = tmp_path / "out"
    ranks = run_ranks(_stream, size, tmp_path / "spawn", out, layout, timeout=90)
    first = ranks[0]
    assert first["held"] == ["high_noise"]
    *jobs, cancelled = first["jobs"]
    assert [j["status"] for j in jobs] == ["done"] * 3, jobs
    assert all(j["progress"]["step"] == 12 for j in jobs)  # the low-noise group's rows
    assert all(r["worked"] == 4 for r in ranks[1:])
    assert first["cancel"]["cancel_requested"] and cancelled["status"] == "cancelled"
    assert 4 <= cancelled["progress"]["step"] < 60  # stopped by group 1, mid-way
    assert not (out / "videos" / f"{cancelled['id']}.mp4").exists()
    records = [json.loads((out / "videos" / f"{j['id']}.mp4.json").read_text()) for j in jobs]
    spans = [{s["expert"]: (s["start"], s["end"]) for s in r["stages"]} for r in records]
    # group 0 runs request i + 1 while group 1 still works on request i
    overlaps = [
        spans[i + 1]["high_noise"][0] < spans[i]["low_noise"][1]
        and spans[i]["low_noise"][0] < spans[i + 1]["high_noise"][1]
        for i in range(len(jobs) - 1)
    ]
    assert any(overlaps), spans
    torch.set_num_threads(1)
    pipe = tiny_pipeline()
    for i, (_job, request) in enumerate(zip(jobs, STREAM, strict=True)):
        single = tmp_path / "single" / f"{i}.mp4"
        publish_video(
            pipe.generate(GenerateSettings(**request)).frames, {}, single, fps=pipe.config.fps
        )
        assert (
            records[i]["video"]["sha256"]
            == json.loads(single.with_suffix(".mp4.json").read_text())["video"]["sha256"]
        )


@pytest.mark.parametrize(
    "env, flags, message",
    [
        ({}, ["--expert-groups", "2"], "--expert-groups 2 runs on 2 processes and this is one"),
        ({"WORLD_SIZE": "2"}, [], "has 2 processes but nothing splits the work"),
        ({"WORLD_SIZE": "4"}, ["--ulysses", "2"], "needs 2 processes .* but the world has 4"),
        ({"WORLD_SIZE": "3"}, ["--expert-groups", "3"], "has 2 experts .* got 3"),
        (
            {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"},
            ["--expert-groups", "2"],
            "serves from one node .* 1 of its 2 processes on this node",
        ),
        (
            {"WORLD_SIZE": "2"},
            ["--expert-groups", "2", "--residency", "swap"],
            "--residency swap is not supported with it",
        ),
    ],
)
def test_launches_that_cannot_serve_are_refused_in_one_line(
    tmp_path, monkeypatch, env, flags, message
):
    from typer.testing import CliRunner

    from vidmoe.cli import app

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    if env:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")
    for k, v in env.items():
        monkeypatch.setenv(k, v)  # as torchrun sets them; refused before joining a group
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["serve", "tiny-t2v", "--outputs", str(out), *flags])
    assert r.exit_code == 2, r.output
    assert re.search(message, " ".join(r.output.split())), r.output
    assert not out.exists()


def test_a_stream_refuses_plans_that_blend_experts_before_queueing(tmp_path):
    """A model whose config sets a transition band plans steps that need both experts: the
    expert groups' worker refuses them (routes.check_request asks it: 422), a plain one not."""
    from vidmoe.serve.distributed import StageWorker
    from vidmoe.serve.worker import Worker

    pipe = tiny_pipeline()
    plan = pipe.plan(GenerateSettings(**{**SMALL, "boundary": 0.5}, band=0.3))
    team = Team(world=World(), device=torch.device("cpu"), expert_groups=2)
    store = JobStore(tmp_path / "jobs.sqlite")
    Worker(store, tiny_pipeline, tmp_path).check_plan(plan)
    with pytest.raises(ValueError, match="blends high_noise and low_noise in a transition band"):
        StageWorker(store, tiny_pipeline, tmp_path, team=team).check_plan(plan)
