"""Investigation task directories and tools: files written, validation errors, resources and the
prompt, torn-line tolerance, durability under SIGKILL, and the circuit-tracer export."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from spd_mcp.cli import main as cli_main
from spd_mcp.investigation import TaskDir, create_task, list_tasks
from spd_mcp.investigation.artifacts import to_circuit_tracer
from spd_mcp.investigation.methodology import methodology_text
from spd_mcp.model.session import RunSession
from spd_mcp.server import build_server
from tests.realclients.clients import http_server, sdk_http_client

PROMPT = "mia found a ball in the park . the ball was"
EVIDENCE = [{"type": "ablation", "description": "p(is) drops 0.9 -> 0.2", "value": -0.7}]


@pytest.fixture(scope="module")
def session() -> RunSession:
    return RunSession.load("tales")


def run_client(session: RunSession, tmp: Path, task: Path | None, fn: Any) -> Any:
    async def main() -> Any:
        server = build_server(session=session, db_path=tmp / "app.db", task_dir=task,
                              auto_prepare=False)
        async with Client(server) as client:
            return await fn(client)

    return asyncio.run(main())


def test_task_dir_api(tmp_path: Path) -> None:
    td = create_task("tales", "why she?", root=tmp_path, model="opus", max_turns=5,
                     launcher={"host": "h", "job_id": None, "python": sys.executable,
                               "version": "0"})
    assert td.info().question == "why she?" and td.id == td.path.name
    assert td.summary().status == "in_progress"
    assert [e.type for e in td.events()] == ["task_created"]
    td.append_event("launcher", "agent_started", "go", {"pid": 1})
    assert td.append_log("first") == 1 and td.append_log("second", "T") == 2
    assert td.n_log_entries() == 2 and "## T" in td.log_text()
    assert [t.id for t in list_tasks(tmp_path)] == [td.id]
    assert "{model_info}" not in methodology_text("MODEL") and "MODEL" in methodology_text("MODEL")


def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    td = create_task("tales", "q", root=tmp_path)
    td.append_explanation({"explanation_id": "a"})
    with open(td.events_path, "ab") as f:
        f.write(b'{"ts": "2020", "source": "x", "type": "torn", "mess')
    with open(td.explanations_path, "ab") as f:
        f.write(b'{"explanation_id": "b", "beh')
    assert [e.type for e in td.events()] == ["task_created"]
    assert [e["explanation_id"] for e in td.explanations()] == ["a"]


def test_tools_write_the_task_dir(session: RunSession, tmp_path: Path) -> None:
    task = tmp_path / "task"

    async def fn(c: Client) -> dict[str, Any]:
        names = {t.name for t in (await c.list_tools()).tools}
        assert {"update_research_log", "save_explanation", "set_investigation_summary",
                "save_graph_artifact", "submit_suggestion", "get_investigation"} <= names
        r = await c.call_tool("update_research_log", {"entry": "looked at **CI**", "title": "A"})
        assert r.structured_content["n_entries"] == 1
        g = await c.call_tool("compute_graph", {"text": PROMPT})
        gid = g.structured_content["graph_id"]
        a = (await c.call_tool("save_graph_artifact",
                               {"graph_id": gid, "title": "graph", "max_edges": 40})
             ).structured_content
        assert a["n_edges"] == 40 and a["reference"] == f"[[artifact:{a['artifact_id']}]]"
        ok = await c.call_tool("save_explanation", {
            "behaviour": "agreement", "components": [{"key": "1.mlp.up:3", "role": "number"}],
            "evidence": [*EVIDENCE, {"type": "graph", "description": "edge",
                                     "artifact_id": a["artifact_id"]}],
            "confidence": 0.7, "limitations": ["one prompt"]})
        assert not ok.is_error and ok.structured_content["n_explanations"] == 1
        bad = {"behaviour": "b", "components": [{"key": "9.mlp.up:3", "role": "r"}],
               "evidence": EVIDENCE, "confidence": 0.5}
        r = await c.call_tool("save_explanation", bad)
        assert r.is_error and "components[0].key" in r.content[0].text
        r = await c.call_tool("save_explanation", {**bad, "components": [
            {"key": "1.mlp.up:3", "role": "r"}], "evidence": [{"type": "vibes",
                                                             "description": "d"}]})
        assert r.is_error and "evidence.0.type" in r.content[0].text
        r = await c.call_tool("save_explanation", {**bad, "components": [
            {"key": "1.mlp.up:3", "role": "r"}], "confidence": 1.5})
        assert r.is_error and "confidence" in r.content[0].text
        r = await c.call_tool("save_graph_artifact", {"graph_id": 999, "title": "x"})
        assert r.is_error and "graph_id" in r.content[0].text
        await c.call_tool("submit_suggestion", {"text": "more filters", "category": "tool"})
        await c.call_tool("set_investigation_summary",
                          {"title": "Agreement", "summary": "s", "status": "completed"})
        info = (await c.call_tool("get_investigation", {})).structured_content
        assert info["counts"] == {"log_entries": 1, "explanations": 1, "artifacts": 1,
                                  "events": len(TaskDir(task).events())}
        log = await c.read_resource("investigation://research_log")
        assert "looked at **CI**" in log.contents[0].text
        res = await c.read_resource(f"investigation://artifacts/{a['artifact_id']}")
        assert json.loads(res.contents[0].text)["schema"] == "spd-mcp/graph-artifact"
        p = await c.get_prompt("investigate", {"question": "how is agreement done?"})
        text = p.messages[0].content.text
        assert "how is agreement done?" in text and "1.mlp.up" in text and "agreement" in text
        return a

    a = run_client(session, tmp_path, task, fn)
    td = TaskDir(task)
    assert td.info().question == "(interactive)"
    types = [e.type for e in td.events()]
    for t in ("task_created", "server_started", "research_log", "artifact", "explanation",
              "suggestion", "summary"):
        assert t in types
    assert td.summary().status == "completed" and td.summary().title == "Agreement"
    assert td.explanations()[0]["components"][0]["key"] == "1.mlp.up:3"
    assert td.artifacts() == [a["artifact_id"]]


def test_lazy_task_under_home(session: RunSession, tmp_path: Path) -> None:
    async def fn(c: Client) -> Any:
        return (await c.call_tool("update_research_log", {"entry": "x"})).structured_content

    out = run_client(session, tmp_path, None, fn)
    home = Path(os.environ["SPD_MCP_HOME"]) / "investigations"
    assert out["note"] and str(home) in out["note"] and Path(out["path"]).parent.parent == home
    assert len(list_tasks()) == 1


def test_export_graph_circuit_tracer(session: RunSession, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    task = tmp_path / "task"

    async def fn(c: Client) -> str:
        g = await c.call_tool("optimize_graph", {"text": PROMPT, "label_token": "red",
                                                 "steps": 20})
        gid = g.structured_content["graph_id"]
        r = await c.call_tool("save_graph_artifact", {"graph_id": gid, "title": "opt"})
        return str(r.structured_content["path"])

    path = Path(run_client(session, tmp_path, task, fn))
    art = json.loads(path.read_text())
    assert art["metadata"]["graph_kind"] == "optimized" and "metrics" in art["metadata"]
    out = tmp_path / "ct.json"
    assert cli_main(["export-graph", str(path), "--format", "circuit-tracer",
                     "--out", str(out)]) == 0
    ct = json.loads(out.read_text())
    assert set(ct) == {"metadata", "qParams", "nodes", "links"}
    for k in ("slug", "scan", "prompt_tokens", "prompt", "schema_version"):
        assert k in ct["metadata"]
    ids = {n["node_id"] for n in ct["nodes"]}
    assert len(ids) == len(ct["nodes"]) == len(art["nodes"])
    for n in ct["nodes"]:
        assert {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp",
                "influence", "activation", "is_target_logit", "token_prob"} <= set(n)
    assert {n["feature_type"] for n in ct["nodes"]} >= {"embedding", "logit"}
    assert sum(n["is_target_logit"] for n in ct["nodes"]) == 1
    assert all(lk["source"] in ids and lk["target"] in ids for lk in ct["links"])
    assert len(ct["links"]) == len(art["edges"])
    assert to_circuit_tracer(art) == ct
    assert cli_main(["investigations", "list", "--root", str(tmp_path)]) == 0
    assert cli_main(["investigations", "show", str(task)]) == 0
    assert cli_main(["investigations", "tail", str(task), "-n", "3"]) == 0
    assert "artifact" in capsys.readouterr().out


def test_sigkill_mid_burst_leaves_whole_lines(tmp_path: Path) -> None:
    task = tmp_path / "task"
    cmd = [str(Path(sys.executable).with_name("spd-mcp")), "serve", "--run", "tales",
           "--no-auto-prepare", "--task-dir", str(task)]
    acked_logs: list[int] = []
    acked_exps: list[str] = []
    with http_server(cmd, tmp_path / "logs") as srv:

        async def burst() -> None:
            async with sdk_http_client(srv.url) as c:

                async def one(i: int) -> None:
                    with contextlib.suppress(Exception):
                        await call(i)

                async def call(i: int) -> None:
                    if i % 2:
                        r = await c.call_tool("update_research_log",
                                              {"entry": f"entry {i} " + "x" * 3000})
                        if not r.is_error:
                            acked_logs.append(i)
                    else:
                        r = await c.call_tool("save_explanation", {
                            "behaviour": f"b{i}", "components": [{"key": "0.mlp.up:1",
                                                                  "role": "r" * 400}],
                            "evidence": EVIDENCE, "confidence": 0.5})
                        if not r.is_error:
                            acked_exps.append(r.structured_content["explanation_id"])

                async def killer() -> None:
                    while len(acked_logs) < 10 or len(acked_exps) < 10:
                        await asyncio.sleep(0.005)
                    os.killpg(srv.proc.pid, signal.SIGKILL)

                tasks = [asyncio.create_task(one(i)) for i in range(400)]
                kill = asyncio.create_task(killer())
                await asyncio.wait([*tasks, kill], timeout=60)
                for t in tasks:
                    t.cancel()

        # the client fails when its server dies
        with contextlib.suppress(Exception, asyncio.CancelledError, BaseExceptionGroup):
            asyncio.run(burst())
        assert srv.proc.wait(timeout=10) == -signal.SIGKILL
    assert len(acked_logs) >= 5 and len(acked_exps) >= 5
    assert len(acked_logs) + len(acked_exps) < 400, "the kill came after the burst"
    for name in ("events.jsonl", "explanations.jsonl"):
        raw = (task / name).read_bytes()
        lines = raw.split(b"\n")
        assert lines[-1] == b"", f"{name} ends with a torn line"
        for line in lines[:-1]:
            json.loads(line)
    td = TaskDir(task)
    saved = {e["explanation_id"] for e in td.explanations()}
    assert set(acked_exps) <= saved
    log = td.log_text()
    for i in acked_logs:
        assert f"entry {i} " in log
    logged = {e.data["n_entries"] for e in td.events() if e.type == "research_log" and e.data}
    assert len(logged) >= len(acked_logs)
