"""SIGKILL while a job runs, restart on the same folder: no accepted job is lost or run twice."""

import time

from tests.serve.server import SMALL, Server, submit, wait_for
from vidmoe.io.video import read_video


def test_sigkill_and_restart_finishes_every_job_exactly_once(tmp_path):
    outputs = tmp_path / "outputs"
    first = Server(outputs).start()
    try:
        with first.client() as c:
            ids = [
                submit(c, prompt="one", **SMALL),
                submit(c, prompt="two", **{**SMALL, "num_steps": 60}),
                submit(c, prompt="three", **SMALL),
            ]
            done_before = wait_for(c, ids[0])
            wait_for(c, ids[1], lambda j: j["status"] == "running" and j["progress"]["step"] >= 2)
    finally:
        first.kill()
    assert done_before["status"] == "done"
    videos = outputs / "videos"
    assert not (videos / f"{ids[1]}.mp4").exists()
    (videos / f".{ids[1]}.mp4.x1y2.tmp.mp4").write_bytes(
        b"half a video"
    )  # as a kill mid-write leaves

    second = Server(outputs).start()
    try:
        with second.client() as c:
            jobs = [wait_for(c, i) for i in ids]
            listed = c.get("/v1/jobs").json()
    finally:
        second.stop()
    assert [j["status"] for j in jobs] == ["done"] * 3
    assert [j["attempts"] for j in jobs] == [1, 2, 1]  # only the interrupted job ran again
    assert jobs[0]["finished"] == done_before["finished"]  # finished stays finished
    assert listed["total"] == 3 and sorted(j["id"] for j in listed["jobs"]) == sorted(ids)
    names = sorted(p.name for p in videos.iterdir())
    assert names == sorted([f"{i}.mp4" for i in ids] + [f"{i}.mp4.json" for i in ids])
    for i in ids:
        frames, _ = read_video(videos / f"{i}.mp4")
        assert frames.shape[0] == SMALL["num_frames"]
    assert time.time() > jobs[1]["finished"] > jobs[1]["started"]
