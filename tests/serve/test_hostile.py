"""Hostile input against a real `vidmoe serve` (issue 24): every reproduction gets a clear 4xx,
nothing that could not run is queued, the job list always answers, the server stays responsive.

The fuzz pass over the `/v1/jobs` schema is in `test_fuzz.py`.
"""

import base64
import io
import json
import sqlite3
import statistics
import threading
import time
import uuid

import pytest
from PIL import Image

from tests.serve.conftest import TOKEN
from tests.serve.server import FINISHED, SMALL, Server, submit, wait_for

JSON = {"content-type": "application/json"}


def strict(text: str):
    """Parse a response as JSON that has no NaN or Infinity (what any other client expects)."""

    def refuse(name):
        raise AssertionError(f"the server sent {name}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


def total(c) -> int:
    r = c.get("/v1/jobs")
    assert r.status_code == 200, r.text
    return strict(r.text)["total"]


LIMITS = ("--max-steps", "1000", "--max-frames", "161", "--max-pixels", str(1280 * 720))
"""The shared defaults (`Limits.for_model` for tiny-t2v), set as an operator would."""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("hostile") / "outputs", max_queue=8, extra=LIMITS).start()
    yield s
    s.stop()


# -- (2) bounded work: the event loop never waits on a request --------------------------------
def test_health_answers_within_100_ms_while_heavy_requests_are_handled(hostile):
    # each body is 3 MB of JSON: parsing, type checks and settings take the server a while
    sigmas = [1 - i / 1e6 for i in range(1, 300_001)]  # descending, each in (0, 1)
    heavy = json.dumps({"prompt": "x", "sigmas": sigmas}).encode()
    answers, spans = [], []

    def post():
        with hostile.client() as c:
            t0 = time.monotonic()
            answers.append(c.post("/v1/plan", content=heavy, headers=JSON))
            spans.append((t0, time.monotonic()))

    threads = [threading.Thread(target=post) for _ in range(2)]
    latencies = []
    with hostile.client() as c:
        c.get("/v1/health")  # connected
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            t0 = time.monotonic()
            assert c.get("/v1/health").status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.02)
    busy = max(end for _, end in spans) - min(start for start, _ in spans)
    assert [r.status_code for r in answers] == [422] * 2
    assert all("300000" in r.json()["detail"] and "1000" in r.json()["detail"] for r in answers)
    assert busy > 0.5 and len(latencies) >= 5, (busy, latencies)  # the polls overlapped the work
    assert statistics.median(latencies) < 0.1, latencies
    assert max(latencies) < 1.0, latencies  # the loop was never held for the whole request


OVER_LIMITS = [
    ({"num_steps": 3_000_000}, ("3000000", "1000")),
    ({"steps_per_expert": {"high_noise": 2_000_000, "low_noise": 1}}, ("2000001", "1000")),
    ({"num_frames": 100_001}, ("100001", "161")),
    ({"width": 100_000, "height": 16}, ("100000x16", "921600")),
]  # the value and the limit, whichever check (the shared one or the server's) refuses first


@pytest.mark.parametrize("body, named", OVER_LIMITS, ids=[json.dumps(b) for b, _ in OVER_LIMITS])
def test_work_over_the_limits_is_refused_at_once(hostile, body, named):
    with hostile.client() as c:
        before = total(c)
        for route in ("/v1/plan", "/v1/jobs"):
            t0 = time.monotonic()
            r = c.post(route, json={"prompt": "x", **body})
            assert r.status_code == 422 and all(n in r.json()["detail"] for n in named), r.text
            assert time.monotonic() - t0 < 5  # was 139 s for the 3,000,000-step plan
        assert total(c) == before
        limits = c.get("/v1/model").json()["limits"]
        assert limits["max_steps"] == 1000 and limits["max_num_frames"] == 161


def test_default_limits_need_core_validation(token_server):
    """Started without --max-* options, the server keeps the shared limits for the model."""
    with token_server.client() as c:
        for body in ({"num_frames": 100_001}, {"width": 100_000, "height": 16}):
            r = c.post("/v1/plan", json={"prompt": "x", **body})
            assert r.status_code == 422, (body, r.text[:200])


# -- (1) NaN and Infinity ------------------------------------------------------------------------
NON_FINITE = [
    b'{"num_steps": 1, "guidance": {"high_noise": NaN}}',
    b'{"shift": Infinity}',
    b'{"boundary": -Infinity}',
    b'{"guidance": {"low_noise": 1e400}}',
    b'{"sigmas": [0.9, NaN]}',
]


@pytest.mark.parametrize("body", NON_FINITE, ids=[b.decode() for b in NON_FINITE])
def test_nan_and_infinity_are_refused_when_the_body_is_parsed(hostile, body):
    with hostile.client() as c:
        before = total(c)
        for route in ("/v1/jobs", "/v1/plan"):
            r = c.post(route, content=body, headers=JSON)
            assert r.status_code == 422, r.text
            assert "finite number" in r.json()["detail"]
        assert total(c) == before


def test_nan_in_a_form_is_refused(hostile):
    with hostile.client() as c:
        r = c.post("/v1/jobs", data={"prompt": "x", "shift": "nan"})
        assert r.status_code == 422 and r.json()["detail"].startswith("shift must be a number")
        r = c.post("/v1/jobs", data={"prompt": "x", "guidance": '{"high_noise": NaN}'})
        assert r.status_code == 422 and "guidance must be JSON" in r.json()["detail"]


def _insert(
    db,
    status: str,
    *,
    request: str,
    settings: str,
    plan: str,
    attempts: int = 0,
    timings: str | None = None,
) -> str:
    job_id = str(uuid.uuid4())
    db.execute(
        "INSERT INTO jobs (id, status, request, settings, plan, created, num_steps, attempts, "
        "timings) VALUES (?, ?, ?, ?, ?, ?, 2, ?, ?)",
        (job_id, status, request, settings, plan, time.time(), attempts, timings),
    )
    return job_id


def test_a_poisoned_database_never_breaks_the_list_nor_blocks_the_queue(tmp_path):
    outputs = tmp_path / "outputs"
    first = Server(outputs).start()
    try:
        with first.client() as c:
            good = wait_for(c, submit(c, prompt="good", **SMALL))
    finally:
        first.stop()
    db = sqlite3.connect(outputs / "vidmoe-jobs.sqlite", isolation_level=None)
    request, settings, plan = db.execute(
        "SELECT request, settings, plan FROM jobs WHERE id=?", (good["id"],)
    ).fetchone()
    nan = json.loads(settings)
    nan["guidance"]["high_noise"] = float("nan")  # as a server before this fix stored it
    nan_request = {**json.loads(request), "guidance": {"high_noise": float("nan")}}
    ids = {
        "nan_done": _insert(
            db,
            "done",
            request=request,
            settings=json.dumps(nan),
            plan=plan,
            timings='{"total": Infinity}',
        ),
        "unreadable": _insert(db, "failed", request="{broken", settings="{broken", plan="]"),
        "nan_queued": _insert(
            db, "queued", request=json.dumps(nan_request), settings=settings, plan=plan
        ),
        "garbage_queued": _insert(db, "queued", request="[1, 2]", settings=settings, plan=plan),
        "killed_twice": _insert(
            db, "running", request=request, settings=settings, plan=plan, attempts=2
        ),
        "killed_once": _insert(
            db, "running", request=request, settings=settings, plan=plan, attempts=1
        ),
    }
    db.close()

    second = Server(outputs).start()
    try:
        with second.client() as c:
            listed = c.get("/v1/jobs")
            assert listed.status_code == 200
            assert strict(listed.text)["total"] == 7
            for name, job_id in ids.items():
                r = c.get(f"/v1/jobs/{job_id}")
                assert r.status_code == 200, (name, r.text)
                strict(r.text)
            shown = strict(c.get(f"/v1/jobs/{ids['nan_done']}").text)
            assert shown["settings"]["guidance"]["high_noise"] is None
            jobs = {name: wait_for(c, job_id) for name, job_id in ids.items()}
            assert jobs["killed_twice"]["status"] == "failed"
            assert "stopped during each of this job's 2 runs" in jobs["killed_twice"]["error"]
            assert jobs["killed_once"]["status"] == "done" and jobs["killed_once"]["attempts"] == 2
            assert jobs["garbage_queued"]["status"] == "failed"
            assert "cannot be read" in jobs["garbage_queued"]["error"]
            assert jobs["nan_queued"]["status"] in ("done", "failed")
            after = wait_for(c, submit(c, prompt="after", **SMALL))  # the queue moves on
            assert after["status"] == "done"
            assert c.get("/v1/jobs", params={"limit": 200}).status_code == 200
    finally:
        second.stop()


# -- (4), (5), (7) wrong types get 422 with a message that names the type --------------------------
WRONG_TYPES = [
    ({"boundary": [0.5]}, "boundary must be a number (a sigma) or a mode string; got a list"),
    ({"boundary": {}}, "boundary must be a number (a sigma) or a mode string; got an object"),
    ({"shift": [1]}, "shift must be a number; got a list"),
    ({"shift": "abc"}, "shift must be a number; got a string ('abc')"),
    (
        {"steps_per_expert": {"high_noise": [1]}},
        "steps_per_expert for high_noise must be an integer; got a list",
    ),
    ({"width": "64"}, "width must be an integer; got a string ('64')"),
    ({"num_frames": True}, "num_frames must be an integer; got a boolean (True)"),
    ({"num_steps": 2.0}, "num_steps must be an integer; got a number (2.0)"),
    ({"negative_prompt": 5}, "negative_prompt must be a string; got an integer (5)"),
    ({"negative_prompt": ["a"]}, "negative_prompt must be a string; got a list"),
    ({"seed": 2**63}, "seed must fit a signed 64-bit integer (below 2**63)"),
    ({"seed": -(2**63) - 1}, "seed must fit a signed 64-bit integer"),
    ({"seed": "1"}, "seed must be an integer; got a string ('1')"),
    ({"guidance": {"high_noise": "4"}}, "guidance for high_noise must be a number; got a string"),
    ({"guidance": [4, 3]}, "guidance must be an object of expert name -> value; got a list"),
    ({"sigmas": "0.5"}, "sigmas must be a list of numbers; got a string"),
    ({"sigmas": [0.5, None]}, "sigmas must be a list of numbers; got a list"),
    ({"prompt": {"a": 1}}, "prompt must be a string; got an object"),
    ({"sampler": 3}, "sampler must be a string; got an integer (3)"),
    ({"rewrite_prompt": "yes"}, "rewrite_prompt must be true or false; got a string ('yes')"),
    ({"rewrite_prompt": 1}, "rewrite_prompt must be true or false; got an integer (1)"),
]


@pytest.mark.parametrize("body, message", WRONG_TYPES, ids=[json.dumps(b) for b, _ in WRONG_TYPES])
def test_wrong_types_get_422_naming_the_type(hostile, body, message):
    with hostile.client() as c:
        before = total(c)
        for route in ("/v1/jobs", "/v1/plan"):
            r = c.post(route, json={"prompt": "x", **SMALL, **body})
            assert r.status_code == 422, r.text
            assert r.json()["detail"].startswith(message), r.json()["detail"]
            assert "use 16" not in r.json()["detail"]
        assert total(c) == before


def test_query_numbers_too_large_get_422(hostile):
    with hostile.client() as c:
        for params in (
            {"offset": "99999999999999999999"},
            {"limit": "99999999999999999999"},
            {"offset": "-1"},
        ):
            r = c.get("/v1/jobs", params=params)
            assert r.status_code == 422, (params, r.text)


def test_zero_is_a_value_not_the_default_needs_core_validation(hostile):
    """`width: 0` made a 64x64 video: 0 must be refused as a size (the shared validation's)."""
    with hostile.client() as c:
        for body in ({"width": 0}, {"height": 0}, {"num_frames": 0}):
            r = c.post("/v1/plan", json={"prompt": "x", **{**SMALL, **body}})
            assert r.status_code == 422, (body, r.text)


# -- (3) cross-site requests ---------------------------------------------------------------------
def test_cross_site_requests_and_rebound_names_are_refused(hostile):
    body = json.dumps({"prompt": "x", **SMALL})
    with hostile.client() as c:
        before = total(c)
        for origin in ("http://evil.example", "null", f"http://localhost:{hostile.port + 1}"):
            r = c.post("/v1/jobs", content=body, headers={**JSON, "Origin": origin})
            assert r.status_code == 403 and "cross-site" in r.json()["detail"], (origin, r.text)
        r = c.delete(f"/v1/jobs/{uuid.uuid4()}", headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
        for kind in ("text/plain", "text/plain;charset=UTF-8", "application/xml"):
            r = c.post("/v1/jobs", content=body, headers={"content-type": kind})
            assert r.status_code == 415 and "application/json" in r.json()["detail"], kind
        assert total(c) == before
        # the server's own page may (the browser sends its Origin with every POST)
        for name in ("127.0.0.1", "localhost"):
            own = {"Host": f"{name}:{hostile.port}", "Origin": f"http://{name}:{hostile.port}"}
            assert c.post("/v1/plan", content=body, headers={**JSON, **own}).status_code == 200
        # DNS rebinding: a page whose name now points at 127.0.0.1 reads nothing
        for host in ("attacker.example", f"attacker.example:{hostile.port}", "127.0.0.2"):
            for path in ("/v1/jobs", "/v1/health", "/v1/openapi.json", "/"):
                r = c.get(path, headers={"Host": host})
                assert r.status_code == 400 and "Host" in r.json()["detail"], (host, path)
        assert c.get("/v1/jobs", headers={"Host": f"[::1]:{hostile.port}"}).status_code == 200


def test_allowed_hosts_and_origins_and_a_model_that_fails_to_load(tmp_path):
    from fastapi.testclient import TestClient

    from vidmoe.serve.app import ServeConfig, create_app

    def load():  # as load_pipeline fails for `--device cuda` on a machine without CUDA
        raise RuntimeError("Torch not compiled with CUDA enabled")

    cfg = ServeConfig(
        model="tiny-t2v",
        outputs=tmp_path / "outputs",
        allowed_origins=("https://ui.example",),
        allowed_hosts=("api.example",),
    )
    with TestClient(create_app(cfg, load=load), base_url="http://127.0.0.1:7860") as c:
        deadline = time.monotonic() + 30
        while (health := c.get("/v1/health").json())["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert health["status"] == "error" and "CUDA" in health["load_error"], health
        r = c.post("/v1/jobs", json={"prompt": "x", **SMALL})
        assert r.status_code == 503 and "failed to load" in r.json()["detail"], r.text
        assert total(c) == 0  # never queued to wait forever
        configured = {"Origin": "https://ui.example", "Host": "api.example"}
        r = c.post("/v1/plan", json={"prompt": "x", **SMALL}, headers=configured)
        assert r.status_code == 200, r.text  # planning needs no model
        r = c.post("/v1/plan", json={"prompt": "x"}, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403
        assert c.get("/v1/health", headers={"Host": "other.example"}).status_code == 400


# -- (8) token, docs, base64 ---------------------------------------------------------------------
def test_token_in_any_case_and_the_docs_behind_it(token_server):
    with token_server.client(auth=False) as anon:
        for scheme in ("bearer", "BEARER", "Bearer"):
            r = anon.get("/v1/health", headers={"Authorization": f"{scheme} {TOKEN}"})
            assert r.status_code == 200, scheme
        auth = {"Authorization": f"bearer {TOKEN}"}
        for path in ("/v1/docs", "/v1/openapi.json"):
            assert anon.get(path).status_code == 401, path
            assert anon.get(path, headers=auth).status_code == 200, path
        assert "/v1/jobs" in anon.get("/v1/openapi.json", headers=auth).json()["paths"]
        # with a token, the token is the guard: a name the server cannot know is fine with it
        other = {"Host": f"gpu-box.lan:{token_server.port}"}
        assert anon.get("/v1/jobs", headers={**other, **auth}).status_code == 200
        assert anon.get("/v1/jobs", headers=other).status_code == 401
        # and a page elsewhere still may not change jobs, even holding the token
        r = anon.post(
            "/v1/plan",
            json={"prompt": "x", **SMALL},
            headers={**auth, "Origin": "http://evil.example"},
        )
        assert r.status_code == 403


def test_docs_are_open_without_a_token(hostile):
    with hostile.client() as c:
        assert "swagger" in c.get("/v1/docs").text.lower()
        assert "/v1/plan" in c.get("/v1/openapi.json").json()["paths"]


def test_base64_wrapped_at_76_columns_is_decoded(hostile):
    png = io.BytesIO()
    Image.effect_noise((24, 24), 64).convert("RGB").save(png, format="PNG")
    wrapped = base64.encodebytes(png.getvalue()).decode()  # MIME: a line break every 76 columns
    assert "\n" in wrapped.strip()
    with hostile.client() as c:
        for image in (wrapped, "data:image/png;base64," + wrapped, wrapped.replace("\n", "\r\n")):
            r = c.post("/v1/plan", json={"prompt": "x", **SMALL, "image": image})
            assert r.status_code == 422 and "takes no image" in r.json()["detail"]  # decoded
        r = c.post("/v1/plan", json={"prompt": "x", "image": "not base64 at all!"})
        assert r.status_code == 422 and "base64" in r.json()["detail"]


# -- (2) cancellation inside the VAE decode ------------------------------------------------------
def test_vae_decode_callback_sees_each_chunk_stops_the_decode_and_changes_nothing():
    import torch

    from vidmoe.loading import load_pipeline

    vae = load_pipeline("tiny-t2v", device="cpu").vae
    z = torch.randn(1, vae.config.z_dim, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    seen = []
    with torch.no_grad():
        plain = vae.decode(z)
        watched = vae.decode(z, callback=lambda i, n: seen.append((i, n)))
    assert torch.equal(plain, watched) and seen == [(0, 3), (1, 3), (2, 3)]

    class Stop(Exception):
        pass

    def stop(i, n):
        seen.append(i)
        raise Stop

    seen.clear()
    with pytest.raises(Stop), torch.no_grad():
        vae.decode(z, callback=stop)
    assert seen == [0]  # the other chunks never ran


def test_a_running_job_is_cancelled_inside_a_long_decode(hostile):
    with hostile.client() as c:  # 11 latent frames to decode: many seconds of VAE work
        job_id = submit(c, prompt="long decode", width=64, height=64, num_frames=41, num_steps=1)
        in_decode = wait_for(
            c,
            job_id,
            timeout=120,
            until=lambda j: j["status"] in FINISHED or j["progress"]["phase"] == "decode",
        )
        assert in_decode["status"] == "running", in_decode
        t0 = time.monotonic()
        r = c.delete(f"/v1/jobs/{job_id}")
        assert r.status_code == 202, r.text
        job = wait_for(c, job_id, timeout=120)
        waited = time.monotonic() - t0
    assert job["status"] == "cancelled" and waited < 8, (job["status"], waited)
    assert not (hostile.outputs / "videos" / f"{job_id}.mp4").exists()


# -- (8) start-up mistakes end in one line, not a traceback --------------------------------------
def test_serve_refuses_a_bad_port_an_outputs_file_and_a_bad_origin(tmp_path):
    from typer.testing import CliRunner

    from vidmoe.cli import app

    run = CliRunner().invoke
    r = run(app, ["serve", "tiny-t2v", "--port", "99999"])
    assert r.exit_code == 2 and "65535" in r.output
    a_file = tmp_path / "outputs"
    a_file.write_text("not a folder")
    r = run(app, ["serve", "tiny-t2v", "--outputs", str(a_file)])
    assert r.exit_code == 2 and "must be a folder" in r.output and "Traceback" not in r.output
    r = run(
        app,
        [
            "serve",
            "tiny-t2v",
            "--outputs",
            str(tmp_path / "o"),
            "--allowed-origin",
            "https://ui.example/path",
        ],
    )
    assert r.exit_code == 2 and "scheme://host[:port]" in r.output
    assert not (tmp_path / "o").exists()  # refused before anything was created
