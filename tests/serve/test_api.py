"""The /v1 job API against a real server process: submit, poll, video, events, cancel, errors."""

import io
import json
import uuid
from urllib.parse import quote

import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.serve.server import SMALL, submit, wait_for
from vidmoe.io.video import read_video


def test_submit_poll_and_read_video_back(server, tmp_path):
    with server.client() as c:
        r = c.post("/v1/jobs", json={"prompt": "a red square", **SMALL, "seed": 3})
        assert r.status_code == 202
        body = r.json()
        assert body["status"] == "queued" and uuid.UUID(body["id"]).version == 4
        assert len(body["plan"]) == SMALL["num_steps"]  # the plan exists before anything runs
        assert all(set(s["experts"]) <= {"high_noise", "low_noise"} for s in body["plan"])
        job = wait_for(c, body["id"])
        assert job["status"] == "done", job
        assert job["progress"]["step"] == SMALL["num_steps"] and job["attempts"] == 1
        assert {"denoise", "decode", "write", "total"} <= set(job["timings"])

        video = c.get(job["video_url"])
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        (tmp_path / "v.mp4").write_bytes(video.content)
        frames, fps = read_video(tmp_path / "v.mp4")
        assert frames.shape == (SMALL["num_frames"], SMALL["height"], SMALL["width"], 3)
        assert fps == 16

        part = c.get(job["video_url"], headers={"Range": "bytes=10-109"})
        assert part.status_code == 206
        assert part.headers["content-range"] == f"bytes 10-109/{len(video.content)}"
        assert part.content == video.content[10:110]

        record = c.get(f"/v1/jobs/{body['id']}/settings").json()
        assert record["settings"]["seed"] == 3 and record["settings"]["prompt"] == "a red square"
        assert [s["experts"] for s in record["plan"]["steps"]] == [
            s["experts"] for s in body["plan"]
        ]
        assert len(record["trace"]) == SMALL["num_steps"] and "decode" in record["timings"]


def _events(response):
    """Parse a server-sent event stream into (name, data) pairs."""
    name, events = None, []
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line[5:])))
    return events


def test_event_stream_reports_steps_and_experts_then_ends(server):
    with server.client() as c:
        submit(c, prompt="ahead", **{**SMALL, "num_steps": 12})  # queued behind it, it then runs
        job_id = submit(c, prompt="events", **{**SMALL, "num_steps": 6})  # within one poll or two
        with c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = _events(r)
    assert events[-1][0] == "done" and events[-1][1]["status"] == "done"
    assert all(name == "progress" for name, _ in events[:-1])
    steps = [d["progress"]["step"] for _, d in events]
    assert steps == sorted(steps)  # progress never goes back
    running = [d["progress"] for _, d in events if d["status"] == "running"]
    assert all(p["num_steps"] == 6 for p in running)
    # every denoising step from the first one the stream saw on is reported once, in order, with
    # the expert(s) the plan gave it, even steps that ran between two polls of the job store
    with server.client() as c:
        plan = c.get(f"/v1/jobs/{job_id}").json()["plan"]
    denoise = [p for p in running if p["phase"] == "denoise"]
    first = events[0][1]
    start = (
        0
        if first["status"] == "queued" or first["progress"]["phase"] is None
        else (first["progress"]["step"])
    )
    assert [p["step"] for p in denoise] == list(range(start, 6))
    assert [p["experts"] for p in denoise] == [plan[p["step"]]["experts"] for p in denoise]


BAD_INPUTS = [
    ({"num_frames": 8}, ["--frames", "8"]),
    ({"width": 50}, ["-W", "50"]),
    ({"num_steps": 0}, ["--steps", "0"]),
    ({"boundary": 1.5}, ["--boundary", "1.5"]),
    ({"boundary": 0}, ["--boundary", "0"]),
    ({"guidance": {"high_noise": -1}}, ["-g", "high_noise=-1"]),
    ({"guidance": {"middle": 2}}, ["-g", "middle=2"]),
    ({"sampler": "heun"}, ["--sampler", "heun"]),
]


@pytest.mark.parametrize("body, cli_args", BAD_INPUTS, ids=[str(b) for b, _ in BAD_INPUTS])
def test_bad_settings_get_422_with_the_cli_message(server, body, cli_args):
    from vidmoe.cli import app

    cli = CliRunner().invoke(app, ["generate", "x", "-m", "tiny-t2v", *cli_args])
    assert cli.exit_code == 2
    cli_message = cli.output.split("error: ", 1)[1].strip()
    with server.client() as c:
        before = c.get("/v1/jobs").json()["total"]
        for route in ("/v1/jobs", "/v1/plan"):
            r = c.post(route, json={"prompt": "x", **body})
            assert r.status_code == 422
            assert r.json()["detail"] == cli_message
        assert c.get("/v1/jobs").json()["total"] == before  # never queued


def test_malformed_bodies_and_images_get_422(server):
    with server.client() as c:
        before = c.get("/v1/jobs").json()["total"]
        assert c.post("/v1/jobs", content=b"{not json").status_code == 422
        assert c.post("/v1/jobs", json=[1, 2]).status_code == 422
        as_curl = {"content-type": "application/x-www-form-urlencoded"}  # curl -d '{...}'
        r = c.post("/v1/jobs", content=b'{"num_frames": 8}', headers=as_curl)
        assert r.status_code == 422 and r.json()["detail"].startswith("num_frames must be 4k+1")
        r = c.post("/v1/jobs", json={"prompt": "x", "colour": "red"})
        assert r.status_code == 422 and "unknown field 'colour'" in r.json()["detail"]
        r = c.post("/v1/jobs", json={"prompt": "x", "image": "bm90IGFuIGltYWdl"})  # "not an image"
        assert r.status_code == 422 and "could not be decoded" in r.json()["detail"]
        r = c.post("/v1/jobs", data={"prompt": "x"}, files={"image": ("a.png", b"\x89PNG junk")})
        assert r.status_code == 422 and "could not be decoded" in r.json()["detail"]
        png = io.BytesIO()
        Image.new("RGB", (8, 8)).save(png, format="PNG")
        r = c.post("/v1/jobs", data={"prompt": "x"}, files={"image": ("a.png", png.getvalue())})
        assert (
            r.status_code == 422 and "takes no image" in r.json()["detail"]
        )  # decoded, then refused
        r = c.post(
            "/v1/jobs",
            content=b"x" * (11 * 1024 * 1024),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413
        assert c.get("/v1/jobs").json()["total"] == before


def test_multipart_form_is_accepted_like_json(server):
    with server.client() as c:
        r = c.post(
            "/v1/plan", data={"prompt": "form", "num_steps": "3", "guidance": '{"low_noise": 2}'}
        )
        assert r.status_code == 200, r.text
        assert len(r.json()["plan"]) == 3 and r.json()["settings"]["guidance"]["low_noise"] == 2.0
        for flag, value in (("off", False), ("true", True), ("0", False)):  # a form's rewrite flag
            r = c.post("/v1/plan", data={"prompt": "form", "rewrite_prompt": flag})
            assert r.status_code == 200 and r.json()["settings"]["rewrite_prompt"] is value, r.text
        r = c.post("/v1/plan", data={"prompt": "form", "rewrite_prompt": "maybe"})
        assert r.status_code == 422 and "rewrite_prompt must be true or false" in r.text


def test_cancel_queued_and_running_and_full_queue_gets_429(server):
    with server.client() as c:  # this server was started with --max-queue 2
        long = submit(c, prompt="long", **{**SMALL, "num_steps": 300})
        wait_for(c, long, lambda j: j["status"] == "running" and j["progress"]["step"] >= 1)
        queued = [submit(c, prompt=f"q{i}", **SMALL) for i in range(2)]
        assert [c.get(f"/v1/jobs/{q}").json()["queue_position"] for q in queued] == [1, 2]
        full = c.post("/v1/jobs", json={"prompt": "one too many", **SMALL})
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1

        r = c.delete(f"/v1/jobs/{queued[0]}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert c.get(f"/v1/jobs/{queued[1]}").json()["queue_position"] == 1
        r = c.delete(f"/v1/jobs/{long}")
        assert r.status_code == 202 and r.json()["cancel_requested"]
        stopped = wait_for(c, long)
        assert stopped["status"] == "cancelled" and stopped["progress"]["step"] < 300
        assert wait_for(c, queued[1])["status"] == "done"
        skipped = c.get(f"/v1/jobs/{queued[0]}").json()
        assert skipped["status"] == "cancelled" and skipped["started"] is None
        for job_id in (long, queued[0]):
            assert c.get(f"/v1/jobs/{job_id}/video").status_code == 409
            assert not (server.outputs / "videos" / f"{job_id}.mp4").exists()
        assert c.delete(f"/v1/jobs/{queued[1]}").status_code == 409  # already done


@pytest.mark.parametrize(
    "bad",
    [
        "nope",
        "../../etc/passwd",
        "..",
        str(uuid.uuid4()),
        str(uuid.uuid4()).upper(),
        "%00",
        "1" * 300,
    ],
)
def test_unknown_or_malformed_ids_get_404(server, bad):
    with server.client() as c:
        for suffix in ("", "/video", "/settings", "/events"):
            assert c.get(f"/v1/jobs/{quote(bad, safe='')}{suffix}").status_code == 404
        assert c.delete(f"/v1/jobs/{quote(bad, safe='')}").status_code == 404


def test_list_is_newest_first_and_paged(server):
    with server.client() as c:
        ids = [c.post("/v1/jobs", json={"prompt": f"p{i}", **SMALL}).json()["id"] for i in range(2)]
        page = c.get("/v1/jobs", params={"limit": 1}).json()
        assert [j["id"] for j in page["jobs"]] == [ids[1]] and page["next_offset"] == 1
        page2 = c.get("/v1/jobs", params={"limit": 1, "offset": 1}).json()
        assert [j["id"] for j in page2["jobs"]] == [ids[0]]
        for job_id in ids:
            wait_for(c, job_id)


def test_health_model_and_ui_page(server):
    with server.client() as c:
        health = c.get("/v1/health").json()
        assert health["status"] == "ok" and health["model"] == "tiny-t2v"
        model = c.get("/v1/model").json()
        assert [e["name"] for e in model["experts"]] == ["high_noise", "low_noise"]
        assert model["params"]["total"] == 2 * model["params"]["active"] > 0
        assert model["boundaries"] == [0.875] and model["frames"]["rule"] == "4k+1"
        assert model["size_multiple"] == 16
        page = c.get("/")
        assert page.status_code == 200 and "/ui/app.js" in page.text
        assert c.get("/ui/app.js").status_code == 200
