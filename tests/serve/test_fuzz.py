"""A seeded fuzz pass over the JSON schema of `POST /v1/jobs` against a real server: never a 500,
never a queued job that `resolve_settings` would refuse, and the job list always answers.

Bodies mix plausible values for each field with hostile ones (wrong types, NaN and Infinity,
integers past 64 bits, nested junk, unknown fields). The server runs with tiny limits, so a job
it accepts is small; each is cancelled at once to keep the worker free.
"""

import json
import math
import random
import sqlite3

import pytest

from tests.serve.server import Server
from vidmoe.loading import model_config_for
from vidmoe.sampling.settings import GenerateSettings, resolve_settings
from vidmoe.serve.requests import FIELDS

SEED, COUNT = 20240524, 160
LIMITS = {"max_steps": 2, "max_num_frames": 5, "max_pixels": 32 * 32}

HOSTILE = [
    None,
    True,
    False,
    0,
    -1,
    1,
    7,
    2**31,
    2**63,
    -(2**63) - 1,
    10**30,
    0.5,
    -0.0,
    1e308,
    1e-308,
    float("nan"),
    float("inf"),
    float("-inf"),
    "",
    "x",
    "64",
    "nan",
    "1e400",
    "steps:1",
    "steps:0",
    "release",
    "snr",
    "calibrated",
    [],
    [0.5],
    [1, "a"],
    [[]],
    {},
    {"high_noise": 1},
    {"high_noise": [1]},
    {"low_noise": None},
    {"": 0},
    {"x": {"y": []}},
    "\u0000",
    "é" * 50,
    "a" * 2000,
]


def plausible(rng: random.Random, key: str):
    """A value of the right type for `key`, valid or near the edge of validity."""
    choices = {
        "prompt": lambda: rng.choice(["a red square moving left", "", "x" * rng.randint(1, 300)]),
        "negative_prompt": lambda: rng.choice(["", "blurry", None]),
        "width": lambda: rng.choice([16, 32, 48, 64, 0, -16, 17]),
        "height": lambda: rng.choice([16, 32, 48, 64, 0, -16, 17]),
        "num_frames": lambda: rng.choice([1, 5, 9, 0, 2, -3]),
        "num_steps": lambda: rng.choice([1, 2, 3, 0, -1]),
        "shift": lambda: rng.choice([0.5, 3.0, 5, 0, -1.0, 1e-9]),
        "sampler": lambda: rng.choice(["euler", "unipc", "dpm++", "heun", ""]),
        "guidance": lambda: {
            rng.choice(["high_noise", "low_noise", "middle"]): rng.choice([0, 1.5, 4, -1, 1e6])
        },
        "boundary": lambda: rng.choice([0.5, 0.875, 0, 1, 1.5, "release", "snr", "steps:1"]),
        "steps_per_expert": lambda: {
            "high_noise": rng.randint(-1, 2),
            "low_noise": rng.randint(-1, 2),
        },
        "sigmas": lambda: sorted((rng.random() for _ in range(rng.randint(0, 3))), reverse=True),
        "seed": lambda: rng.choice([0, 1, 2**32, 2**63 - 1, -5]),
        "image": lambda: rng.choice(["", "bm90IGFuIGltYWdl", "data:image/png;base64,xx"]),
        "area": lambda: rng.choice([1024, 32 * 32, 0, -1, 921600]),
        "rewrite_prompt": lambda: rng.choice([True, False, 0, 1, "on", "no"]),
    }
    return choices[key]()


def body(rng: random.Random) -> dict:
    keys = rng.sample(FIELDS, rng.randint(0, 6))
    if rng.random() < 0.1:
        keys.append(rng.choice(["colour", "band", "", "__proto__"]))
    out = {}
    for key in keys:
        hostile = rng.random() < 0.4 or key not in FIELDS
        out[key] = rng.choice(HOSTILE) if hostile else plausible(rng, key)
    if rng.random() < 0.5:  # keep many bodies small enough to be accepted
        out |= {"width": 32, "height": 32, "num_frames": 5, "num_steps": rng.choice([1, 2])}
    return out


def all_finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(all_finite(v) for v in value)
    return True


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    limits = ("--max-steps", "2", "--max-frames", "5", "--max-pixels", str(32 * 32))
    s = Server(tmp_path_factory.mktemp("fuzz") / "outputs", max_queue=200, extra=limits).start()
    yield s
    s.stop()


def test_fuzz_the_jobs_schema(fuzz_server):
    rng, config = random.Random(SEED), model_config_for("tiny-t2v")
    statuses, accepted = {}, []
    with fuzz_server.client() as c:
        for i in range(COUNT):
            sent = body(rng)
            r = c.post(
                "/v1/jobs", content=json.dumps(sent), headers={"content-type": "application/json"}
            )
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code in (202, 422), (i, sent, r.status_code, r.text)
            if r.status_code == 202:
                job_id = r.json()["id"]
                c.delete(f"/v1/jobs/{job_id}")
                accepted.append((sent, c.get(f"/v1/jobs/{job_id}").json()))
            else:
                assert isinstance(r.json()["detail"], str) and r.json()["detail"]
            if i % 20 == 0:
                assert c.get("/v1/jobs", params={"limit": 200}).status_code == 200
        listed = c.get("/v1/jobs", params={"limit": 200})
    assert listed.status_code == 200 and listed.json()["total"] == len(accepted)
    assert statuses.get(202, 0) >= 10 and statuses.get(422, 0) >= 50, statuses  # both kinds ran
    db = sqlite3.connect(fuzz_server.outputs / "vidmoe-jobs.sqlite")
    stored = dict(db.execute("SELECT id, request FROM jobs").fetchall())
    db.close()
    for sent, job in accepted:
        # what the worker will run: the stored request, as the worker reads it
        request = json.loads(stored[job["id"]])
        assert all_finite(sent) and all_finite(request) and all_finite(job["settings"]), sent
        resolved = resolve_settings(GenerateSettings(**request), config)  # raises if it refuses
        assert resolved.num_steps <= LIMITS["max_steps"]
        assert resolved.num_frames <= LIMITS["max_num_frames"]
        assert resolved.width * resolved.height <= LIMITS["max_pixels"]
