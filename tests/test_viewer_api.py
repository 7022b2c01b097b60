"""The viewer's HTTP API without a browser: runs, graphs (counts equal the analysis layer's view),
interventions, component cards, investigations, the markdown sanitiser, the launcher, the CLI."""

from __future__ import annotations

import json
import multiprocessing
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from spd_mcp.analysis.graph_view import view_graph
from spd_mcp.investigation.taskdir import create_task
from spd_mcp.model.session import RunSession
from spd_mcp.service.graphs import _natural_graph
from spd_mcp.viewer.app import STATIC, create_app
from spd_mcp.viewer.markdown import artifact_refs, link_allowed, render_markdown
from tests.viewer_browser import stored_graph

PROMPT = "mia found a ball . the ball was"


@pytest.fixture(scope="module")
def session() -> RunSession:
    return RunSession.load("tales")


@pytest.fixture
def client(session: RunSession) -> Iterator[TestClient]:
    with TestClient(create_app("tales", session=session)) as c:
        yield c


def wait_job(client: TestClient, job: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while job["status"] == "running":
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
        job = client.get(f"/api/jobs/{job['id']}").json()
    return job


# -- sanitiser ---------------------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    "javascript:alert(1)", "JavaScript:alert(1)", " javascript:alert(1)", "java\tscript:alert(1)",
    "data:text/html,<script>alert(1)</script>", "vbscript:msgbox(1)", "file:///etc/passwd",
    "//evil.example/x",
])
def test_link_allow_list_rejects(url: str) -> None:
    assert not link_allowed(url)


@pytest.mark.parametrize("url", ["https://arxiv.org/abs/2506.20790", "http://x.org", "#entry-2",
                                 "notes.md", "mailto:a@b.c"])
def test_link_allow_list_accepts(url: str) -> None:
    assert link_allowed(url)


def test_markdown_renders_scripts_and_javascript_links_inert() -> None:
    log = ("<!-- entry 1 2026-01-01T00:00:00Z -->\n## Plan\n\n"
           "<script>alert('x')</script>\n\n"
           "[click](javascript:alert(1)) [d](data:text/html;base64,PHNjcmlwdD4=) "
           "<a href=\"javascript:alert(2)\">raw</a> <img src=x onerror=alert(3)> "
           "![img](https://tracker.example/pixel.png) [ok](https://arxiv.org/abs/2506.20790)\n\n"
           "See [[artifact:g3-a1b2c3]] and [[artifact:../../etc]].\n\n"
           "| a | b |\n|---|---|\n| 1 | 2 |\n")
    html = render_markdown(log)
    assert "<script" not in html and "&lt;script&gt;" in html
    hrefs = re.findall(r"<a\s+href=\"([^\"]*)\"", html)
    assert hrefs == ["https://tracker.example/pixel.png", "https://arxiv.org/abs/2506.20790"]
    assert len(re.findall(r"<a\b", html)) == len(hrefs)  # no other anchors, no attributes
    assert "<img" not in html and "&lt;img src=x onerror=alert(3)&gt;" in html
    assert "[click](javascript:alert(1))" in html  # left as plain text
    assert '<a href="https://arxiv.org/abs/2506.20790">ok</a>' in html
    assert 'data-artifact="g3-a1b2c3"' in html and "../../etc" in html  # a bad id stays text
    assert "entry 1" not in html and "<table>" in html
    assert artifact_refs(log) == ["g3-a1b2c3"]


# -- runs and graphs ---------------------------------------------------------------------------
def test_runs_and_info(client: TestClient) -> None:
    data = client.get("/api/runs").json()
    assert data["default_run"] == "tales"
    tales = next(r for r in data["runs"] if r["name"] == "tales")
    assert len(tales["layers"]) == 12 and tales["n_components"] == sum(x["C"] for x in
                                                                       tales["layers"])
    assert set(tales["analyses"]) == {"harvest", "attributions", "labels"}
    info = client.get("/api/runs/tales/info").json()
    assert info["layers"][0]["name"] == "0.attn.q" and info["planted_behaviours"]
    assert client.get("/api/runs/nope-not-a-run/info").status_code == 400


def test_graph_matches_the_analysis_view(client: TestClient, session: RunSession) -> None:
    bad = client.post("/api/runs/tales/graphs", json={"text": "mia found a zyzzyva"})
    assert bad.status_code == 400 and "zyzzyva" in bad.json()["error"]
    bad = client.post("/api/runs/tales/graphs", json={"text": PROMPT, "label_token": "qqq"})
    assert bad.status_code == 400 and "qqq" in bad.json()["error"]
    bad = client.post("/api/runs/tales/graphs", json={"text": PROMPT, "mode": "optimized"})
    assert bad.status_code == 400 and "target token" in bad.json()["error"]

    job = wait_job(client, client.post("/api/runs/tales/graphs", json={"text": PROMPT}).json())
    assert job["status"] == "done" and job["total"] > 0, job
    gid = job["result"]["graph_id"]
    art = client.get(f"/api/runs/tales/graphs/{gid}?ci_threshold=0.2&max_edges=5000").json()

    g = stored_graph(session, gid)
    view = view_graph(session, gid, g, ci_threshold=0.2, top_k=5000)
    assert len(art["edges"]) == min(view.n_edges_matching, 5000) > 0
    assert {n["key"] for n in art["nodes"]} == {n.key for n in view.nodes}
    assert art["layers"][0] == "embed" and art["layers"][-1] == "output"

    assert client.get(f"/api/runs/tales/graphs/{gid}?ci_threshold=2").status_code == 400
    assert client.get("/api/runs/tales/graphs/99999").status_code == 400

    # Interventions: a bad node key is a readable 400; "ablate the rest" ablates the others.
    bad = client.post("/api/runs/tales/interventions", json={"text": PROMPT, "nodes": ["9.x:1:1"]})
    assert bad.status_code == 400 and "9.x" in bad.json()["error"]
    nodes = [n["key"] for n in art["nodes"] if n["layer"] not in ("embed", "output")][:3]
    job = wait_job(client, client.post("/api/runs/tales/interventions", json={
        "text": PROMPT, "nodes": nodes, "label_token": "red", "pgd_steps": 3,
        "ablate_rest_of": gid}).json())
    assert job["status"] == "done", job
    res = job["result"]["result"]
    assert set(res["loss"]) == {"target", "ci", "stochastic", "adversarial", "ablated"}
    assert len(res["predictions"]) == len(session.encode(PROMPT))
    assert all(set(p["regimes"]) == {"ci", "stochastic", "adversarial", "ablated"} and
               set(p["label"]) == {"target", "ci", "stochastic", "adversarial", "ablated"}
               for p in res["predictions"])
    assert len(job["result"]["ablated_nodes"]) == sum(
        1 for lay in g.node_layer if lay not in ("embed", "output")) - len(nodes)


def test_component_card_without_harvest(client: TestClient) -> None:
    card = client.get("/api/runs/tales/components/1.mlp.up:3").json()
    assert card["info"] is None and "spd-mcp prepare tales" in card["notice"]
    bad = client.get("/api/runs/tales/components/1.mlp.up:99999")
    assert bad.status_code == 400 and "99999" in bad.json()["error"]


def test_job_unknown(client: TestClient) -> None:
    assert client.get("/api/jobs/nope").status_code == 404


# -- investigations ----------------------------------------------------------------------------
def _task_with_log(entry: str) -> Path:
    td = create_task("tales", "why <b>she</b>?", launcher={"kind": "test"})
    td.append_log(entry, "Findings")
    td.write_artifact("g1-abc123", {"schema": "spd-mcp/graph-artifact", "title": "t",
                                    "nodes": [], "edges": [], "prompt": {"tokens": []}})
    td.append_event("server", "research_log", "Findings")
    return td.path


def test_investigation_list_detail_and_artifact(client: TestClient) -> None:
    path = _task_with_log("<script>alert(1)</script> [x](javascript:alert(1)) "
                          "see [[artifact:g1-abc123]]")
    items = client.get("/api/investigations").json()["investigations"]
    (item,) = items
    assert item["dir"] == path.name and item["status"] == "in_progress"
    assert item["last_event"]["type"] == "research_log" and item["age_s"] >= 0
    assert client.get("/api/investigations?run=other").json()["investigations"] == []
    d = client.get(f"/api/investigations/{path.name}").json()
    assert "<script" not in d["log_html"] and "&lt;script&gt;" in d["log_html"]
    assert "<a" not in d["log_html"]  # the javascript: link stays plain text
    assert 'data-artifact="g1-abc123"' in d["log_html"] and d["artifacts"] == ["g1-abc123"]
    assert d["info"]["question"] == "why <b>she</b>?"  # escaped by the page (textContent)
    art = client.get(f"/api/investigations/{path.name}/artifacts/g1-abc123").json()
    assert art["title"] == "t"
    for bad in ("..", "nope", "a%2F..%2F..", ".hidden"):
        assert client.get(f"/api/investigations/{bad}").status_code in (400, 404)
    assert client.get(f"/api/investigations/{path.name}/artifacts/nope").status_code == 400


def test_launch_uses_the_scripted_investigator_without_claude(
    session: RunSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spd_mcp.viewer.launch import SCRIPTED_NOTICE, launch_argv, pick_mode

    assert pick_mode({"PATH": str(tmp_path)}) == "scripted"
    fake = tmp_path / "claude"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert pick_mode({"PATH": str(tmp_path)}) == "scripted"  # no API key
    assert pick_mode({"PATH": str(tmp_path), "ANTHROPIC_API_KEY": "k"}) == "claude"
    q = tmp_path / "q.md"
    assert launch_argv("scripted", "tales", q, tmp_path)[3:6] == ["demo", "--run", "tales"]
    assert launch_argv("claude", "tales", q, tmp_path)[3:5] == ["investigate", "tales"]

    # The endpoint, with a stand-in for the scripted investigator that only creates its task.
    script = ("import sys; from spd_mcp.investigation.taskdir import create_task; "
              "create_task('tales', open(sys.argv[1]).read())")
    seen: dict[str, Any] = {}

    def argv_for(mode: str, run: str, question_file: Path, root: Path) -> list[str]:
        seen["mode"] = mode
        return [sys.executable, "-c", script, str(question_file)]

    monkeypatch.setattr("spd_mcp.viewer.launch.launch_argv", argv_for)
    app = create_app("tales", session=session, launch_mode="scripted")
    with TestClient(app) as c:
        assert c.post("/api/investigations", json={"run": "tales", "question": ""}
                      ).status_code == 400
        res = c.post("/api/investigations", json={"run": "tales", "question": "Why she?"}).json()
        assert seen["mode"] == "scripted" and res["mode"] == "scripted"
        assert res["notice"] == SCRIPTED_NOTICE and res["task_id"]
        d = c.get(f"/api/investigations/{res['task_id']}").json()
        assert d["info"]["question"] == "Why she?"


# -- static assets and CLI ---------------------------------------------------------------------
def test_static_assets_are_local_and_packaged(client: TestClient) -> None:
    index = client.get("/")
    assert index.status_code == 200 and "default-src 'self'" in index.headers[
        "content-security-policy"]
    for name in ("index.html", "app.js", "graph.js", "style.css"):
        text = (STATIC / name).read_text()
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", text), name
        assert "@import" not in text and "url(http" not in text
        assert client.get(f"/static/{name}").status_code == 200 or name == "index.html"
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert "viewer/static/*" in pyproject


def test_view_cli_refuses_other_hosts(capsys: pytest.CaptureFixture[str]) -> None:
    from spd_mcp.cli import main

    assert main(["view", "--host", "0.0.0.0"]) == 2
    assert "loopback only" in capsys.readouterr().err
    assert main(["view", "--port", "70000"]) == 2


def test_job_result_is_json() -> None:
    from spd_mcp.viewer.jobs import JobView

    v = JobView(id="a", kind="graph", status="done", done=1, total=1, message="m",
                elapsed_s=0.1, result={"graph_id": 1})
    assert json.loads(v.model_dump_json())["result"] == {"graph_id": 1}


def test_optimised_graph_job_reports_progress_and_metrics(client: TestClient) -> None:
    job = wait_job(client, client.post("/api/runs/tales/graphs", json={
        "text": PROMPT, "mode": "optimized", "label_token": "red", "steps": 5}).json())
    assert job["status"] == "done", job
    assert job["done"] == job["total"] == 5
    assert set(job["result"]["metrics"]["label_prob"]) >= {"target", "ci"}
    art = client.get(f"/api/runs/tales/graphs/{job['result']['graph_id']}").json()
    assert art["metadata"]["graph_kind"] == "optimized" and art["edges"]


def test_graph_through_the_worker_process(session: RunSession) -> None:
    """With a worker process the viewer's graph job reports progress and stores the same graph
    as the analysis computes here."""
    with TestClient(create_app("tales", session=session, worker=True)) as c:
        job = wait_job(c, c.post("/api/runs/tales/graphs", json={"text": PROMPT}).json())
        assert job["status"] == "done" and job["total"] > 0, job
        assert "spd-worker" in {p.name for p in multiprocessing.active_children()}
        g = stored_graph(session, job["result"]["graph_id"])
    ids = session.encode(PROMPT)
    here, _ = _natural_graph(session, ids, ci_threshold=0.0, pos=len(ids) - 1, top_k_outputs=5,
                             label=None)
    assert (g.n_nodes, g.n_edges) == (here.n_nodes, here.n_edges)
    assert g.edge_src.tolist() == here.edge_src.tolist()
