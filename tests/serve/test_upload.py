"""Image uploads: decoded by Pillow only, stored under the job's id, fed to an image model."""

import base64
import io
import time

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed")

from vidmoe.serve.requests import decode_image  # noqa: E402


def _png(size=(40, 24), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_image_accepts_images_and_refuses_the_rest():
    assert decode_image(_png(), 1 << 20).size == (40, 24)
    for junk in (
        b"",
        b"GIF89a" + b"\0" * 10,
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        _png()[:40],
    ):
        with pytest.raises(ValueError, match="could not be decoded"):
            decode_image(junk, 1 << 20)
    with pytest.raises(ValueError, match="limit"):
        decode_image(_png(), 10)


def test_uploaded_image_conditions_a_ti2v_job(tmp_path):
    from fastapi.testclient import TestClient

    from vidmoe.serve.app import ServeConfig, create_app

    app = create_app(ServeConfig(model="tiny-ti2v", outputs=tmp_path / "out", device="cpu"))
    small = {"width": "32", "height": "32", "num_frames": "5", "num_steps": "2"}
    with TestClient(app, base_url="http://127.0.0.1") as c:  # a loopback Host
        r = c.post(
            "/v1/jobs",
            data={"prompt": "up", **small},
            files={"image": ("../../evil name.png", _png(), "image/png")},
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        b64 = "data:image/png;base64," + base64.b64encode(_png()).decode()
        r2 = c.post(
            "/v1/jobs",
            json={"prompt": "b64", "image": b64, **{k: int(v) for k, v in small.items()}},
        )
        assert r2.status_code == 202, r2.text
        deadline = time.monotonic() + 60
        while c.get(f"/v1/jobs/{r2.json()['id']}").json()["status"] not in ("done", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        job = c.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "done", job
    stored = tmp_path / "out" / "uploads" / f"{job_id}.png"
    assert job["settings"]["image"] == str(stored)  # the server's name, never the client's
    assert Image.open(stored).size == (40, 24)
    assert sorted(p.name for p in (tmp_path / "out" / "uploads").iterdir()) == sorted(
        [f"{job_id}.png", f"{r2.json()['id']}.png"]
    )
