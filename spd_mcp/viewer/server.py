"""Running the viewer app with uvicorn on a socket bound here (port 0 = the OS picks a free one)."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from spd_mcp.viewer.app import create_app


def bind(host: str, port: int) -> tuple[socket.socket, str]:
    """A listening-ready socket on ``host:port`` and the viewer's URL."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    shown = f"[{host}]" if ":" in host else host
    return sock, f"http://{shown}:{sock.getsockname()[1]}/"


def _uvicorn(app: Any) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))


async def serve(run: str, *, host: str = "127.0.0.1", port: int = 8780,
                device: str = "cpu") -> None:
    """Serve until interrupted; prints ``spd-mcp viewer: URL`` once listening."""
    sock, url = bind(host, port)
    server = _uvicorn(create_app(run, device=device))

    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.02)
        print(f"spd-mcp viewer: {url}  (run {run}; Ctrl-C to stop)", file=sys.stderr, flush=True)

    task = asyncio.create_task(announce())
    try:
        await server.serve(sockets=[sock])
    finally:
        task.cancel()


@contextmanager
def running(app: Any, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``app`` in a background thread on a free port (tests, benchmarks); yields the URL."""
    sock, url = bind(host, 0)
    server = _uvicorn(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(1000):
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.01)
        if not server.started:
            raise RuntimeError("the viewer did not start")
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
