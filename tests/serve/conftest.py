"""Servers shared by the serve tests: one open, one behind a token (auth and browser tests)."""

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, httpx) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn, httpx) is not installed")
pytest.importorskip("httpx", reason="the serve extra (fastapi, uvicorn, httpx) is not installed")

from tests.serve.server import Server  # noqa: E402

TOKEN = "test-token-3f9a"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve") / "outputs", max_queue=2).start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def token_server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve-token") / "outputs", token=TOKEN).start()
    yield s
    s.stop()
