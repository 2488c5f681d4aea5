"""Token auth: every /v1 route needs the bearer token; a public address needs a token at all."""

from typer.testing import CliRunner

from tests.serve.server import SMALL


def test_every_api_route_needs_the_token(token_server):
    routes = [
        ("GET", "/v1/health"),
        ("GET", "/v1/model"),
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
        ("POST", "/v1/plan"),
        ("GET", "/v1/jobs/00000000-0000-4000-8000-000000000000"),
    ]
    with token_server.client(auth=False) as anon, token_server.client() as c:
        for method, path in routes:
            r = anon.request(method, path, json={"prompt": "x", **SMALL})
            assert r.status_code == 401, (method, path)
            assert r.headers["www-authenticate"] == "Bearer"
            wrong = anon.request(method, path, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
        assert c.get("/v1/jobs").json()["total"] == 0  # the rejected POST queued nothing
        assert c.get("/v1/health").status_code == 200
        assert c.post("/v1/plan", json={"prompt": "x", **SMALL}).status_code == 200
        assert (
            anon.get("/").status_code == 200
        )  # the page itself holds no data; it asks for the token


def test_public_address_without_token_is_refused(monkeypatch):
    from vidmoe.cli import app

    monkeypatch.delenv("VIDMOE_TOKEN", raising=False)
    r = CliRunner().invoke(app, ["serve", "tiny-t2v", "--host", "0.0.0.0", "--port", "1"])
    assert r.exit_code == 2 and "--token" in r.output
