"""Background jobs: a long call answers with a job handle and keeps running; get_job reports its
progress, then the result the tool would have returned (or its error). Through the SDK client
against the real server, plus the job book on its own (eviction, shutdown, the commit rule)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mcp import Client

from spd_mcp.errors import InputError
from spd_mcp.model.session import RunSession
from spd_mcp.server import build_server
from spd_mcp.service import graphs as graph_service
from spd_mcp.service.executor import ComputeExecutor
from spd_mcp.service.jobs import Job, JobBook, after_s_from_env, job_book
from spd_mcp.service.state import AppState, compute

PROMPT = "mia found a ball in the park . the ball was"


@pytest.fixture(scope="module")
def session() -> RunSession:
    return RunSession.load("tales")


def run_server(session: RunSession, db: Path, fn: Callable[[Client], Awaitable[Any]], *,
               after: float, auto_prepare: bool = False,
               on_state: Callable[[AppState], None] | None = None) -> Any:
    async def main() -> Any:
        server = build_server(session=session, db_path=db, auto_prepare=auto_prepare,
                              job_after_s=after, on_state=on_state)
        async with Client(server) as client:
            return await fn(client)

    return asyncio.run(main())


async def poll(c: Client, job_id: int, wait_s: float = 30, tries: int = 40) -> list[dict[str, Any]]:
    """get_job until the job is no longer running; every report seen."""
    seen = []
    for _ in range(tries):
        r = await c.call_tool("get_job", {"job_id": job_id, "wait_s": wait_s})
        assert not r.is_error, r.content
        seen.append(r.structured_content)
        if r.structured_content["job"]["status"] != "running":
            return seen
    raise AssertionError(f"job {job_id} still running: {seen[-1]}")


def handle_of(res: Any, tool: str) -> dict[str, Any]:
    """The job handle of a call that became a job (checked for what an agent needs)."""
    assert not res.is_error, res.content
    assert "job" in res.structured_content, res.content[0].text[:300]
    job = res.structured_content["job"]
    assert set(res.structured_content) == {"job"}
    assert job["tool"] == tool and job["status"] in ("queued", "running", "done")  # done: limit 0
    assert f"get_job(job_id={job['job_id']}" in job["next"], job
    assert f'"job_id": {job["job_id"]}' in res.content[0].text  # the text the model reads
    return job


def test_compute_graph_becomes_a_job_with_the_same_result(session: RunSession,
                                                          tmp_path: Path) -> None:
    async def as_job(c: Client) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        res = await c.call_tool("compute_graph", {"text": PROMPT})
        job = handle_of(res, "compute_graph")
        return job, await poll(c, job["job_id"], wait_s=0.2, tries=400)

    async def direct(c: Client) -> dict[str, Any]:
        res = await c.call_tool("compute_graph", {"text": PROMPT})
        assert not res.is_error, res.content
        assert "job" not in res.structured_content
        return res.structured_content  # type: ignore[no-any-return]

    job, reports = run_server(session, tmp_path / "a.db", as_job, after=0)
    want = run_server(session, tmp_path / "b.db", direct, after=600)
    final = reports[-1]
    info = final.pop("job")
    assert info["status"] == "done" and info["job_id"] == job["job_id"]
    assert info["unit"] == "target nodes" and info["done"] == info["total"] > 0
    assert final == want  # the same output as a direct call (both are fresh: cached false)
    running = [r["job"] for r in reports[:-1]]
    assert all(r["status"] == "running" and r["elapsed_s"] >= 0 for r in running)
    assert all(r["done"] <= r["total"] and r["unit"] == "target nodes"
               for r in running if "total" in r)


def test_first_use_harvest_is_a_job_and_cheap_tools_keep_serving(session: RunSession,
                                                                 tmp_path: Path) -> None:
    async def fn(c: Client) -> None:
        bad = await c.call_tool("get_component_info", {"component": "0.attn.q:9999"})
        assert bad.is_error and "C=" in bad.content[0].text  # bad input: at once, no job
        res = await c.call_tool("get_component_info", {"component": "0.attn.q:0"})
        job = handle_of(res, "get_component_info")
        assert job["stage"] == "harvest"
        t0 = time.monotonic()
        for name, args in [("ping", {}), ("tokenize", {"text": PROMPT})]:
            r = await c.call_tool(name, args)
            assert not r.is_error, r.content
        assert time.monotonic() - t0 < 5
        now = (await c.call_tool("get_job", {"job_id": job["job_id"]})).structured_content
        assert now["job"]["status"] == "running"  # the cheap calls did not wait for it
        graph = handle_of(await c.call_tool("compute_graph", {"text": PROMPT}), "compute_graph")
        assert graph["status"] == "queued" and "busy with harvest" in graph["next"], graph
        reports = await poll(c, job["job_id"])
        done = reports[-1]
        assert done["job"]["status"] == "done", done
        assert done["n_tokens"] >= 200_000 and done["key"] == "0.attn.q:0"
        assert (await poll(c, graph["job_id"]))[-1]["job"]["status"] == "done"
        again = await c.call_tool("get_component_info", {"component": "0.attn.q:0"})
        assert not again.is_error and "job" not in again.structured_content

    run_server(session, tmp_path / "a.db", fn, after=1, auto_prepare=True)


def test_bad_arguments_fail_at_once_and_unknown_jobs_are_named(session: RunSession,
                                                                tmp_path: Path) -> None:
    async def fn(c: Client) -> None:
        none = await c.call_tool("get_job", {"job_id": 1})
        assert none.is_error and "there are no jobs" in none.content[0].text
        for args, says in [({"text": PROMPT, "output_position": 99}, "output_position"),
                           ({"text": PROMPT, "ci_threshold": 2}, "ci_threshold"),
                           ({"prompt_id": 77}, "prompt"),
                           ({"text": PROMPT, "label_token": "qqqzzz"}, "qqqzzz")]:
            r = await c.call_tool("compute_graph", args)
            assert r.is_error and says in r.content[0].text, (args, r.content)
        r = await c.call_tool("sweep_ablation", {"text": PROMPT, "label_token": "is",
                                                 "candidates": ["9.nope:1"]})
        assert r.is_error, r.content
        job = handle_of(await c.call_tool("compute_graph", {"text": PROMPT}), "compute_graph")
        assert job["job_id"] == 1  # the failed calls made no jobs
        unknown = await c.call_tool("get_job", {"job_id": 5})
        assert unknown.is_error
        assert "no job 5; jobs: 1 (compute_graph, " in unknown.content[0].text
        await poll(c, 1)

    run_server(session, tmp_path / "a.db", fn, after=0)


@pytest.mark.parametrize("error, says, next_", [
    (InputError("label_token 'x' is not one token"), "label_token 'x' is not one token",
     "fix the arguments"),
    (RuntimeError("kaput"), "internal error (RuntimeError: kaput)", "report the error"),
])
def test_a_failing_job_reports_its_error(session: RunSession, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, error: Exception,
                                         says: str, next_: str) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)
        raise error

    monkeypatch.setattr(graph_service, "compute_graph", fail)

    async def fn(c: Client) -> None:
        job = handle_of(await c.call_tool("compute_graph", {"text": PROMPT}), "compute_graph")
        report = (await poll(c, job["job_id"]))[-1]
        assert set(report) == {"job"}
        info = report["job"]
        assert info["status"] == "failed" and says in info["error"] and next_ in info["next"]

    run_server(session, tmp_path / "a.db", fn, after=0)


def test_shutdown_cancels_running_jobs(session: RunSession, tmp_path: Path) -> None:
    states: list[AppState] = []
    jobs: list[Job[Any]] = []

    async def fn(c: Client) -> None:
        job = handle_of(await c.call_tool("optimize_graph", {
            "text": PROMPT, "label_token": "the"}), "optimize_graph")
        jobs.append(job_book(states[0]).get(job["job_id"]))

    t0 = time.monotonic()
    run_server(session, tmp_path / "a.db", fn, after=0, on_state=states.append)
    assert time.monotonic() - t0 < 60
    assert jobs[0].status == "cancelled" and "shutting down" in (jobs[0].error() or "")


# ------------------------------------------------------------------------------ the job book
def test_job_book_keeps_the_newest_finished_and_commits_at_its_stage() -> None:
    executor = ComputeExecutor()
    st: Any = SimpleNamespace(executor=executor)

    async def heavy(progress: Callable[[int, int], None], secs: float = 0.3) -> str:
        def fn() -> str:
            for i in range(3):
                time.sleep(secs / 3)
                progress(i + 1, 3)
            return "ok"
        return await compute(st, "heavy", fn)

    async def slow_validation(progress: Callable[[int, int], None]) -> str:
        await asyncio.sleep(0.3)
        raise InputError("bad input, found late")

    async def main() -> None:
        book = JobBook(after_s=0, keep=2)
        assert await book.run("quick", lambda p: asyncio.sleep(0, "fast"), stages={"heavy"}) \
            == "fast"  # done before committing: no job
        with pytest.raises(InputError, match="found late"):  # not a job: it never committed
            await book.run("v", slow_validation, stages={"heavy"})
        handles = [await book.run("h", heavy, stages={"heavy"}, unit="rows") for _ in range(3)]
        assert [h.job_id for h in handles if isinstance(h, Job)] == [1, 2, 3]
        job = await book.wait(3, 5)
        assert job.status == "done" and job.result() == "ok" and job.done == job.total == 3
        assert [j.job_id for j in book.jobs()] == [2, 3]  # job 1: the oldest finished, dropped
        with pytest.raises(InputError, match=r"job 1 finished and was dropped.*jobs: 2 "):
            book.get(1)
        running = await book.run("long", lambda p: heavy(p, 3.0), stages={"heavy"})
        assert isinstance(running, Job)
        await book.close()
        assert running.status == "cancelled"
        assert (await book.wait(4, 0)).status == "cancelled"

    try:
        asyncio.run(main())
    finally:
        executor.shutdown()


def test_job_limit_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPD_MCP_JOB_AFTER_S", raising=False)
    assert after_s_from_env() == 20
    monkeypatch.setenv("SPD_MCP_JOB_AFTER_S", "2.5")
    assert after_s_from_env() == 2.5 and after_s_from_env(0) == 0
    monkeypatch.setenv("SPD_MCP_JOB_AFTER_S", "soon")
    with pytest.raises(ValueError, match="not a number"):
        after_s_from_env()
    with pytest.raises(ValueError, match=">= 0"):
        after_s_from_env(-1)
