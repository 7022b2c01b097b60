"""Heavy analyses in a worker process: same results as in-process, progress relayed, errors
keep their type and text, a killed worker fails its job clearly and restarts, and the served
tools give identical answers with and without the worker."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from spd_mcp.analysis.components import active_components
from spd_mcp.errors import AnalysisError, OperationError
from spd_mcp.model.session import RunSession
from spd_mcp.server import build_server
from spd_mcp.service.executor import ComputeExecutor
from spd_mcp.service.worker import WorkerProcess, remote, worker_enabled

PROMPT = "once upon a time , a kind girl named mia lived in a cottage . mia met a"


@pytest.fixture(scope="module")
def session() -> RunSession:
    return RunSession.load("tales")


@pytest.fixture(scope="module")
def worker(session: RunSession) -> Any:
    w = WorkerProcess(threads=1, preload=session)
    yield w
    w.close()


def _counting(session: RunSession, n: int, *, progress: Any = None) -> int:
    for i in range(n):
        if progress is not None:
            progress(i + 1, n)
    return n * 10


def _raises(session: RunSession, word: str) -> None:
    session.encode(f"the {word}")


def _sleeps(session: RunSession, seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _unpicklable(session: RunSession) -> Any:
    return threading.Lock()


def test_a_call_gives_the_same_result_in_the_worker_as_here(
        session: RunSession, worker: WorkerProcess) -> None:
    ids = session.encode(PROMPT)
    call = remote(active_components, session, ids, threshold=0.0, top_per_position=5)
    here, there = call(), worker.run(call)
    assert there.model_dump() == here.model_dump()
    assert worker.pid is not None and worker.pid != os.getpid()


def test_progress_is_relayed_in_order(session: RunSession, worker: WorkerProcess) -> None:
    seen: list[tuple[int, int]] = []
    out = worker.run(remote(_counting, session, 4, progress=lambda d, t: seen.append((d, t))))
    assert out == 40 and seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_an_error_keeps_its_type_and_text(session: RunSession, worker: WorkerProcess) -> None:
    with pytest.raises(AnalysisError, match=r"words not in the vocabulary: \['zzzq'\]"):
        worker.run(remote(_raises, session, "zzzq"))
    assert worker.run(remote(_counting, session, 1)) == 10  # and it keeps serving


def test_an_unpicklable_result_is_a_clear_error(session: RunSession,
                                                worker: WorkerProcess) -> None:
    with pytest.raises(OperationError, match="could not send its result back"):
        worker.run(remote(_unpicklable, session))


def test_a_killed_worker_fails_its_job_and_restarts(session: RunSession) -> None:
    w = WorkerProcess(threads=1)
    try:
        first = w.run(remote(_sleeps, session, 0.0))
        starts = w.starts
        killer = threading.Timer(0.5, lambda: os.kill(first, signal.SIGKILL))
        killer.start()
        with pytest.raises(OperationError, match=r"died \(killed by signal 9 \(perhaps out of "
                                                 r"memory\)\) while running _sleeps"):
            w.run(remote(_sleeps, session, 30.0))
        second = w.run(remote(_sleeps, session, 0.0))
        assert second != first and w.starts == starts + 1
    finally:
        w.close()


def test_executor_runs_calls_in_the_worker_and_plain_callables_here(
        session: RunSession) -> None:
    async def main() -> tuple[int, int]:
        ex = ComputeExecutor(worker=WorkerProcess(threads=1))
        try:
            there = await ex.run("call", remote(_sleeps, session, 0.0))
            here = await ex.run("plain", os.getpid)
            return there, here
        finally:
            ex.shutdown()

    there, here = asyncio.run(main())
    assert here == os.getpid() and there != os.getpid()


def test_worker_env_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPD_MCP_WORKER", raising=False)
    assert worker_enabled() is True
    for off in ("0", "false", "off"):
        monkeypatch.setenv("SPD_MCP_WORKER", off)
        assert worker_enabled() is False
    monkeypatch.setenv("SPD_MCP_WORKER", "1")
    assert worker_enabled(default=False) is True


def test_served_tools_answer_the_same_with_the_worker(session: RunSession,
                                                     tmp_path: Path) -> None:
    async def results(worker: bool, db: Path) -> list[Any]:
        async with Client(build_server(session=session, db_path=db, auto_prepare=False,
                                       worker=worker)) as c:
            out = []
            for tool, args in (
                ("compute_graph", {"text": PROMPT}),
                ("get_ci", {"text": PROMPT, "top_per_position": 3}),
                ("run_intervention", {"text": PROMPT, "nodes": ["1.mlp.down:*:*"],
                                      "regimes": ["ci", "ablated"]}),
                ("sweep_ablation", {"text": PROMPT, "label_token": "kind", "top": 5}),
            ):
                res = await c.call_tool(tool, args)
                assert not res.is_error, res.content
                sc = dict(res.structured_content or {})
                for k in ("graph_id", "run_id", "cached", "validity_note"):
                    sc.pop(k, None)
                out.append(sc)
            bad = await c.call_tool("run_intervention", {"text": PROMPT, "nodes": ["9.x:0:0"]})
            assert bad.is_error
            out.append(bad.content[0].text)  # type: ignore[union-attr]
            return out

    with_worker = asyncio.run(results(True, tmp_path / "a.db"))
    without = asyncio.run(results(False, tmp_path / "b.db"))
    assert with_worker == without


def test_first_use_harvest_is_built_in_the_worker(session: RunSession, tmp_path: Path) -> None:
    """A harvest-backed tool on a fresh home builds the harvest in the worker process (with
    progress) and answers from it in the server."""
    async def main() -> tuple[Any, list[float]]:
        seen: list[float] = []

        async def progress(done: float, total: float | None, message: str | None) -> None:
            seen.append(done)

        async with Client(build_server(session=session, db_path=tmp_path / "h.db",
                                       worker=True, job_after_s=600)) as c:
            res = await c.call_tool("get_component_info", {"component": "1.mlp.down:5"},
                                    progress_callback=progress)
            return res, seen

    res, seen = asyncio.run(main())
    assert not res.is_error, res.content
    assert res.structured_content["key"] == "1.mlp.down:5" and res.structured_content["harvest"]
    assert len(seen) > 2 and seen == sorted(seen)
