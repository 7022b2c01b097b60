"""Streamable HTTP in-process: concurrency (heavy calls serialised, cheap calls not blocked),
bearer tokens, and refusal to bind off loopback without one."""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client

from spd_mcp.model.session import RunSession
from spd_mcp.server import build_server, check_bind, http_server
from spd_mcp.service.state import AppState

PROMPT = "mia found a ball in the park . the ball was"


@pytest.fixture(scope="module")
def session() -> RunSession:
    return RunSession.load("tales")


class Served:
    def __init__(self, session: RunSession, db: Path, token: str | None = None) -> None:
        self.states: list[AppState] = []
        server = build_server(session=session, db_path=db, on_state=self.states.append)
        self.uv, sock, self.url = http_server(server, "127.0.0.1", 0, token)
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [sock]},
                                       daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uv.started:
            assert time.monotonic() < deadline, "HTTP server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.uv.should_exit = True
        self.thread.join(10)


def test_heavy_calls_serialised_cheap_calls_flow(session: RunSession, tmp_path: Path) -> None:
    with Served(session, tmp_path / "app.db") as srv:

        async def main() -> dict[str, Any]:
            async with Client(srv.url) as c:
                await c.call_tool("get_model_info", {})

                async def timed(tool: str, args: dict[str, Any]) -> float:
                    t0 = time.perf_counter()
                    res = await c.call_tool(tool, args)
                    assert not res.is_error, res.content
                    return time.perf_counter() - t0

                idle = [await timed("tokenize", {"text": PROMPT}) for _ in range(20)]
                heavy = [timed("compute_graph", {"text": PROMPT, "top_k_outputs": k})
                         for k in range(1, 9)]
                cheap = [timed("tokenize" if i % 2 else "get_model_info",
                               {"text": PROMPT} if i % 2 else {}) for i in range(50)]
                t0 = time.perf_counter()
                times = await asyncio.gather(*heavy, *cheap)
                wall = time.perf_counter() - t0
                return {"idle": idle, "heavy": times[:8], "cheap": times[8:], "wall": wall}

        out = asyncio.run(main())
        history = [r for r in srv.states[0].executor.history if r.name == "compute_graph"]
    assert len(history) == 8 and all(r.ok for r in history)
    spans = sorted((r.started, r.ended) for r in history)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), "heavy overlap"
    report = {
        "heavy_calls": 8, "cheap_calls": 50,
        "heavy_total_s": round(out["wall"], 3),
        "cheap_idle_p50_ms": round(statistics.median(out["idle"]) * 1e3, 2),
        "cheap_under_load_p50_ms": round(statistics.median(out["cheap"]) * 1e3, 2),
        "cheap_under_load_max_ms": round(max(out["cheap"]) * 1e3, 2),
        "heavy_max_s": round(max(out["heavy"]), 3),
    }
    print("\nconcurrency:", json.dumps(report))
    # Cheap calls must not queue behind the heavy ones.
    assert max(out["cheap"]) < max(out["heavy"])


def test_bearer_token_required(session: RunSession, tmp_path: Path) -> None:
    with Served(session, tmp_path / "app.db", token="s3cret") as srv:
        r = httpx.post(srv.url, json={}, headers={"Accept": "application/json"})
        assert r.status_code == 401
        r = httpx.post(srv.url, json={}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401

        async def main() -> str:
            from mcp.client.streamable_http import streamable_http_client

            async with (
                httpx.AsyncClient(headers={"Authorization": "Bearer s3cret"}) as auth,
                Client(streamable_http_client(srv.url, http_client=auth)) as c,
            ):
                info = await c.call_tool("get_model_info", {})
                return str(info.structured_content["run"])

        assert asyncio.run(main()) == "tales"


def test_refuses_non_loopback_without_token() -> None:
    with pytest.raises(SystemExit, match=r"refusing to serve on .0\.0\.0\.0. without --token"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "t")
    check_bind("127.0.0.1", None)
