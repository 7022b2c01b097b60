"""Running the viewer app with uvicorn on a socket bound here (port 0 = the OS picks a free one)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from spd_mcp.http import bind_socket, serve_announced, uvicorn_server
from spd_mcp.viewer.app import create_app


async def serve(run: str, *, host: str = "127.0.0.1", port: int = 8780,
                device: str = "cpu", bench_dirs: Sequence[Path] = (), worker: bool = False
                ) -> None:
    """Serve until interrupted; prints ``spd-mcp viewer: URL`` once listening."""
    sock, base = bind_socket(host, port)
    server = uvicorn_server(create_app(run, device=device, bench_dirs=bench_dirs,
                                       worker=worker))
    await serve_announced(server, sock, f"spd-mcp viewer: {base}/  (run {run}; Ctrl-C to stop)")


@contextmanager
def running(app: Any, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``app`` in a background thread on a free port (tests, benchmarks); yields the URL."""
    sock, base = bind_socket(host, 0)
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(1000):
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.01)
        if not server.started:
            raise RuntimeError("the viewer did not start")
        yield f"{base}/"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
