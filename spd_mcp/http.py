"""Serving over HTTP, shared by the MCP streamable-HTTP server and the viewer: a socket bound
here (port 0 = OS-assigned, reported back, never probed), a readiness line once listening, and
the bearer-token guard required off loopback."""

from __future__ import annotations

import asyncio
import hmac
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve a non-loopback host without a token."""
    if host not in LOOPBACK and not token:
        raise SystemExit(
            f"refusing to serve on {host!r} without --token: only loopback (127.0.0.1) may be "
            "served unauthenticated"
        )


def bind_socket(host: str, port: int) -> tuple[socket.socket, str]:
    """A socket bound to ``host:port`` (0 = OS-assigned) and its base URL ``http://host:port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    shown = f"[{host}]" if ":" in host else host
    return sock, f"http://{shown}:{sock.getsockname()[1]}"


def bearer_guard(app: Any, token: str) -> Callable[..., Awaitable[None]]:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer <token>``."""
    expected = f"Bearer {token}".encode()

    async def guarded(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            got = headers.get(b"authorization", b"")
            if not hmac.compare_digest(got, expected):
                body = b'{"error": "missing or wrong bearer token"}'
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b"Bearer"),
                ]})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded


def uvicorn_server(app: Any) -> Any:
    """A uvicorn server for ``app`` (quiet, lifespan on), to be served on a bound socket."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))


async def serve_announced(userver: Any, sock: socket.socket, line: str) -> None:
    """Serve on ``sock``; print ``line`` on stderr once uvicorn is listening."""

    async def announce() -> None:
        while not userver.started:
            await asyncio.sleep(0.02)
        print(line, file=sys.stderr, flush=True)

    task = asyncio.create_task(announce())
    try:
        await userver.serve(sockets=[sock])
    finally:
        task.cancel()
