"""Who may call the server: the bearer token, the `Host` header and the `Origin` of
state-changing requests.

- Token: with one configured, every `/v1` route needs `Authorization: Bearer <token>` (the
  scheme in any case), compared in constant time.
- Host (DNS rebinding): without a token, a request whose `Host` is not a loopback name
  (127.0.0.1, localhost, [::1], any port) or one of `allowed_hosts` gets 400, so a page that
  rebinds its own name to 127.0.0.1 reads nothing. With a token, the token is the guard (the
  server cannot know every name it is reached by) unless `allowed_hosts` is given.
- Origin (cross-site requests): a POST, PUT, PATCH or DELETE that carries an `Origin` must come
  from the server's own origin (`http(s)://` + its Host) or one of `allowed_origins`; anything
  else, `null` included, gets 403. Clients that are not browsers send no Origin.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, HTTPException, Request

from vidmoe.serve.state import LOOPBACK_HOSTS, ServeState, serve_state

STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")


def split_host(host: str) -> tuple[str, str | None]:
    """('name', 'port' or None) from a Host header: `localhost:7860`, `[::1]:80`, `example.org`."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host.partition("]")
        return name + "]", rest[1:] if rest.startswith(":") else None
    if host.count(":") == 1:
        name, port = host.split(":")
        return name, port
    return host, None


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """A loopback name with any port, or a name (any port) or name:port listed in `allowed`."""
    name, _ = split_host(host)
    listed = {a.strip().lower() for a in allowed}
    return name in LOOPBACK_HOSTS or name in listed or host.strip().lower() in listed


def check_host(request: Request, s: ServeState) -> None:
    if s.cfg.token is not None and not s.cfg.allowed_hosts:
        return  # the token is the guard
    host = request.headers.get("host", "")
    if not host_allowed(host, s.cfg.allowed_hosts):
        raise HTTPException(
            400,
            f"Host {host!r} is not a name of this server; it answers to 127.0.0.1, localhost "
            "and [::1]: open it by one of those, or start it with --allowed-host NAME",
        )


def check_token(request: Request, s: ServeState) -> None:
    if s.cfg.token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
    right = hmac.compare_digest(given.strip().encode(), s.cfg.token.encode())
    if scheme.lower() != "bearer" or not right:
        raise HTTPException(
            401,
            "missing or wrong token: send Authorization: Bearer <token>",
            headers={"WWW-Authenticate": "Bearer"},
        )


def check_origin(request: Request, s: ServeState) -> None:
    origin = request.headers.get("origin")
    if request.method not in STATE_CHANGING or origin is None:
        return
    host = request.headers.get("host", "").strip().lower()
    own = {f"http://{host}", f"https://{host}"}
    if origin.strip().lower().rstrip("/") in own | {o.lower() for o in s.cfg.allowed_origins}:
        return
    raise HTTPException(
        403,
        f"cross-site request refused: Origin {origin!r} is not this server's own; a page "
        "served elsewhere may not change jobs here (start the server with --allowed-origin "
        "ORIGIN to allow one)",
    )


def guard_api(request: Request, s: ServeState = Depends(serve_state)) -> None:
    """Every `/v1` route: Host, token, then Origin."""
    check_host(request, s)
    check_token(request, s)
    check_origin(request, s)


def guard_page(request: Request, s: ServeState = Depends(serve_state)) -> None:
    """The UI page and its script: Host only (they hold no data and need no token)."""
    check_host(request, s)
