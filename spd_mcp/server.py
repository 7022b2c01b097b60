"""The MCP server: assembly, lifespan (loads the run once) and transports (stdio, streamable HTTP).

``spd-mcp serve --run RUN`` serves stdio; ``--http`` serves streamable HTTP at
``http://HOST:PORT/mcp`` (127.0.0.1 by default; any other host requires ``--token``, and with a
token every request must carry ``Authorization: Bearer TOKEN``). When listening, a line
``SPD-MCP READY <url>`` is printed on stderr so launchers can wait for readiness.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from mcp.server.mcpserver import MCPServer

from spd_mcp.analysis.session import RunSession
from spd_mcp.executor import ComputeExecutor
from spd_mcp.model.run_io import spd_home
from spd_mcp.store import AppStore
from spd_mcp.tools import (
    attributions,
    components,
    editing,
    graphs,
    interventions,
    knowledge,
    model_data,
)
from spd_mcp.tools import investigation as investigation_tools
from spd_mcp.tools.common import AppState

log = logging.getLogger("spd_mcp.server")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

INSTRUCTIONS = """\
spd-mcp serves one SPD decomposition: every weight matrix split into rank-1 components with
learned causal importance (CI). Start with get_model_info (layers, C, key grammar, planted
behaviours). Keys: component 'LAYER:C', node 'LAYER:POS:C'. Typical loop: create_prompt →
get_ci / optimize_graph (sparse circuit for one prediction) → get_graph → run_intervention
(ci / stochastic / adversarial / ablated) and run_ablation to test it. To change behaviour:
edit_components (scale / ablate) or train_component_edit (rank-1 adapters) → measure_edit →
generate(edit=ID)."""


def app_db_path(session: RunSession, home: Path | None = None) -> Path:
    run_id = str(session.run.meta.get("run_id", session.run.name))
    return (home or spd_home()) / "runs" / run_id / "app.db"


def build_server(
    run: str | None = None,
    *,
    device: str = "cpu",
    session: RunSession | None = None,
    db_path: Path | None = None,
    max_queue: int = 16,
    max_wait_s: float = 120.0,
    on_state: Callable[[AppState], None] | None = None,
    auto_prepare: bool = True,
    task_dir: Path | None = None,
) -> MCPServer[AppState]:
    """The server for one run (``session`` reuses an already loaded run, e.g. in tests).

    Investigation tools write to ``task_dir`` (made a task if it is not one), or to a task
    created under ``$SPD_MCP_HOME/investigations/`` on their first call."""
    if session is None and run is None:
        raise ValueError("give run or session")
    inv = investigation_tools.Investigation(task_dir)

    @asynccontextmanager
    async def lifespan(_: MCPServer[AppState]) -> AsyncIterator[AppState]:
        nonlocal session
        if session is None:
            assert run is not None
            session = await asyncio.to_thread(RunSession.load, run, device=device)
        # An investigation gets its own app database (concurrent agents never share one).
        default_db = task_dir / "app.db" if task_dir is not None else app_db_path(session)
        store = await AppStore.open(db_path or default_db)
        executor = ComputeExecutor(max_queue=max_queue, max_wait_s=max_wait_s)
        st = AppState(session=session, executor=executor, store=store, auto_prepare=auto_prepare)
        await asyncio.to_thread(inv.start, session.run.name)
        if on_state is not None:
            on_state(st)
        try:
            yield st
        finally:
            executor.shutdown()
            await store.close()

    tools = [*model_data.tools(), *components.tools(), *knowledge.tools(),
             *attributions.tools(), *graphs.tools(), *interventions.tools(),
             *editing.tools(), *investigation_tools.tools(inv)]
    server = MCPServer("spd", instructions=INSTRUCTIONS, lifespan=lifespan, tools=tools,
                       version=_version())
    investigation_tools.register(server, inv)
    return server


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spd-mcp")
    except PackageNotFoundError:
        return "0"


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


def check_bind(host: str, token: str | None) -> None:
    if host not in LOOPBACK and not token:
        raise SystemExit(
            f"refusing to serve on {host!r} without --token: only loopback (127.0.0.1) may be "
            "served unauthenticated"
        )


def http_server(
    server: MCPServer[Any], host: str, port: int, token: str | None
) -> tuple[Any, socket.socket, str]:
    """(uvicorn server, bound socket, URL) for streamable HTTP; port 0 picks a free port."""
    import uvicorn

    check_bind(host, token)
    app: Any = server.streamable_http_app()
    if token:
        app = bearer_guard(app, token)
    sock, base = bind_socket(host, port)
    userver = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    return userver, sock, f"{base}/mcp"


def bind_socket(host: str, port: int) -> tuple[socket.socket, str]:
    """A socket bound to ``host:port`` (0 = OS-assigned) and its base URL ``http://host:port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    shown = f"[{host}]" if ":" in host else host
    return sock, f"http://{shown}:{sock.getsockname()[1]}"


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


async def serve_http(server: MCPServer[Any], host: str, port: int, token: str | None) -> None:
    userver, sock, url = http_server(server, host, port, token)
    await serve_announced(userver, sock, f"SPD-MCP READY {url}")


def serve(
    run: str,
    *,
    http: bool = False,
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    auto_prepare: bool = True,
    task_dir: Path | None = None,
) -> None:
    """Entry point of ``spd-mcp serve`` (``task_dir``: where investigation tools write)."""
    if http:
        check_bind(host, token)
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = build_server(run, device=device, auto_prepare=auto_prepare, task_dir=task_dir)
    if http:
        asyncio.run(serve_http(server, host, port, token))
    else:
        print("SPD-MCP READY stdio", file=sys.stderr, flush=True)
        server.run("stdio")
