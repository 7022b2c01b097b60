"""The MCP server: assembly, lifespan (loads the run once) and transports (stdio, streamable HTTP).

``spd-mcp serve --run RUN`` serves stdio; ``--http`` serves streamable HTTP at
``http://HOST:PORT/mcp`` (127.0.0.1 by default; any other host requires ``--token``, and with a
token every request must carry ``Authorization: Bearer TOKEN``). When listening, a line
``SPD-MCP READY <url>`` is printed on stderr so launchers can wait for readiness.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from mcp.server.mcpserver import MCPServer

from spd_mcp.http import bearer_guard, bind_socket, check_bind, serve_announced, uvicorn_server
from spd_mcp.model.session import RunSession
from spd_mcp.paths import package_version
from spd_mcp.service.executor import ComputeExecutor
from spd_mcp.service.jobs import after_s_from_env, close_book, open_book
from spd_mcp.service.state import AppState, open_state
from spd_mcp.service.worker import WorkerProcess, worker_enabled
from spd_mcp.tools import (
    attention,
    attributions,
    components,
    editing,
    graphs,
    interventions,
    jobs,
    knowledge,
    model_data,
    patching,
)
from spd_mcp.tools import investigation as investigation_tools

log = logging.getLogger("spd_mcp.server")

INSTRUCTIONS = """\
spd-mcp serves one SPD decomposition: every weight matrix split into rank-1 components with
learned causal importance (CI). Start with get_model_info (layers, C, key grammar, planted
behaviours). Keys: component 'LAYER:C', node 'LAYER:POS:C'. Typical loop: create_prompt →
get_ci / optimize_graph (sparse circuit for one prediction) → get_graph → run_intervention
(ci / stochastic / adversarial / ablated) and run_ablation to test it. To change behaviour:
edit_components (scale / ablate) or train_component_edit (rank-1 adapters) → measure_edit →
generate(edit=ID). A long call (first-use harvest, graphs, sweeps) may answer {"job": {...}}
instead: it keeps running; get_job(job_id) gives its progress, then its result."""


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
    worker: bool = False,
    job_after_s: float | None = None,
) -> MCPServer[AppState]:
    """The server for one run (``session`` reuses an already loaded run, e.g. in tests).

    Investigation tools write to ``task_dir`` (made a task if it is not one), or to a task
    created under ``$SPD_MCP_HOME/investigations/`` on their first call. With ``worker``, heavy
    analyses run in a child process (:mod:`spd_mcp.service.worker`), so cheap tools answer at
    once while they compute. A job tool's call still running after ``job_after_s`` seconds
    (default ``$SPD_MCP_JOB_AFTER_S``, else 20; 0 = at once) answers with a job handle and goes on
    in the background (:mod:`spd_mcp.service.jobs`, polled with ``get_job``)."""
    if session is None and run is None:
        raise ValueError("give run or session")
    after_s = after_s_from_env(job_after_s)
    inv = investigation_tools.Investigation(task_dir)

    @asynccontextmanager
    async def lifespan(_: MCPServer[AppState]) -> AsyncIterator[AppState]:
        nonlocal session
        if session is None:
            assert run is not None
            session = await asyncio.to_thread(RunSession.load, run, device=device)
        # An investigation gets its own app database (concurrent agents never share one).
        investigation_db = task_dir / "app.db" if task_dir is not None else None
        child = (WorkerProcess(threads=torch.get_num_threads(), preload=session) if worker
                 else None)
        if child is not None:
            await asyncio.to_thread(child.start)
        executor = ComputeExecutor(max_queue=max_queue, max_wait_s=max_wait_s, worker=child)
        st = await open_state(session, executor, db_path=db_path or investigation_db,
                              auto_prepare=auto_prepare)
        open_book(st, after_s)
        await asyncio.to_thread(inv.start, session.run.name)
        if on_state is not None:
            on_state(st)
        try:
            yield st
        finally:
            await close_book(st)  # running jobs cancelled (queued computations withdrawn)
            executor.shutdown()
            await st.store.close()

    tools = [*model_data.tools(), *components.tools(), *knowledge.tools(),
             *attributions.tools(), *graphs.tools(), *interventions.tools(),
             *attention.tools(), *patching.tools(), *editing.tools(), *jobs.tools(),
             *investigation_tools.tools(inv)]
    server = MCPServer("spd", instructions=INSTRUCTIONS, lifespan=lifespan, tools=tools,
                       version=package_version())
    investigation_tools.register(server, inv)
    return server


def http_server(
    server: MCPServer[Any], host: str, port: int, token: str | None
) -> tuple[Any, socket.socket, str]:
    """(uvicorn server, bound socket, URL) for streamable HTTP; port 0 picks a free port."""
    check_bind(host, token)
    app: Any = server.streamable_http_app()
    if token:
        app = bearer_guard(app, token)
    sock, base = bind_socket(host, port)
    return uvicorn_server(app), sock, f"{base}/mcp"


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
    worker: bool | None = None,
    job_after_s: float | None = None,
) -> None:
    """Entry point of ``spd-mcp serve`` (``task_dir``: where investigation tools write;
    ``job_after_s``: when a long call becomes a background job)."""
    if http:
        check_bind(host, token)
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = build_server(run, device=device, auto_prepare=auto_prepare, task_dir=task_dir,
                          worker=worker_enabled() if worker is None else worker,
                          job_after_s=job_after_s)
    if http:
        asyncio.run(serve_http(server, host, port, token))
    else:
        print("SPD-MCP READY stdio", file=sys.stderr, flush=True)
        server.run("stdio")
