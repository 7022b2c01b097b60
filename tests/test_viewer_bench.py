"""The viewer's benchmark results: ``/api/bench`` lists result directories under
``$SPD_MCP_HOME/bench`` (newest first, quietly skipping ones without results), ``/api/bench/NAME``
equals ``summarize(read_results(...))`` (shards included) and links each run's task directory; bad
names, unknown names and paths out of the bench root are refused. A browser test opens the page.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from spd_mcp.bench.results import RunRecord, read_results, summarize, wilson
from spd_mcp.investigation.taskdir import create_task
from spd_mcp.paths import spd_home
from spd_mcp.viewer.app import create_app, extra_bench_dirs
from tests.viewer_browser import browser, local_page, missing_reason

NEW, OLD, BROKEN = "20260102-090000", "20260101-090000", "20251231-090000"


def record(task: str, repeat: int, outcome: str, task_dir: Path | str = "", **kw: Any) -> RunRecord:
    return RunRecord(task_id=task, repeat=repeat, agent=kw.pop("agent", "scripted"),
                     outcome=outcome, success=outcome == "success", reason=f"{outcome} because",
                     components=["1.mlp.up:3", "2.attn.q:7"], own_drop=0.8, max_other_drop=0.1,
                     random_drop=0.02, tool_calls=7, tool_errors=int(outcome == "invalid"),
                     agent_seconds=3.5, grade_seconds=1.25, task_dir=str(task_dir), **kw)


def write(path: Path, records: list[RunRecord], mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r.model_dump_json() + "\n" for r in records))
    os.utime(path, (mtime, mtime))


@dataclass
class Bench:
    root: Path
    new: Path
    bench_task: str  # in NEW/tasks
    shard_task: str  # in NEW/shard-1/tasks
    investigation: str  # under the investigations root
    outside: Path  # results reachable only through a link out of the root


@pytest.fixture
def bench(tmp_path: Path) -> Bench:
    root = spd_home() / "bench"
    new = root / NEW
    t1 = create_task("tales", "which component writes red?", path=new / "tasks" / "t1-aaa")
    t1.append_log("found it", "Findings")
    t1.write_artifact("g1-abc123", {"title": "t", "nodes": [], "edges": []})
    t2 = create_task("tales", "sharded?", path=new / "shard-1" / "tasks" / "t2-bbb")
    inv = create_task("tales", "an investigation")
    write(new / "results.jsonl", [
        record("color", 0, "success", t1.path, cost_usd=0.5, input_tokens=100, output_tokens=20),
        record("color", 1, "wrong", "/elsewhere/gone-1", cost_usd=0.25),
        record("count", 0, "inconclusive", inv.path)], mtime=2_000)
    write(new / "shard-0" / "results.jsonl", [record("count", 1, "invalid")], mtime=2_100)
    write(new / "shard-1" / "results.jsonl", [record("pron", 0, "success", t2.path)], mtime=2_050)
    write(root / OLD / "results.jsonl", [record("color", 0, "success", agent="topk")], mtime=1_000)
    (root / BROKEN).mkdir()
    (root / BROKEN / "results.jsonl").write_text("{not json\n")
    os.utime(root / BROKEN / "results.jsonl", (500, 500))
    (root / "no-results" / "tasks").mkdir(parents=True)
    (root / "started").mkdir()
    (root / "started" / "results.jsonl").write_text("")
    (root / ".hidden").mkdir()
    write(root / ".hidden" / "results.jsonl", [record("color", 0, "success")], mtime=3_000)
    outside = tmp_path / "outside"
    write(outside / "results.jsonl", [record("color", 0, "wrong")], mtime=3_000)
    (root / "linked").symlink_to(outside)
    return Bench(root, new, t1.path.name, t2.path.name, inv.path.name, outside)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app("tales")) as c:
        yield c


def as_json(x: Any) -> Any:
    return json.loads(json.dumps(x))


def test_list_is_newest_first_and_skips_dirs_without_results(
    client: TestClient, bench: Bench
) -> None:
    data = client.get("/api/bench").json()
    assert data["root"] == str(bench.root)
    rows = data["results"]
    assert [r["name"] for r in rows] == [NEW, OLD, BROKEN]
    new, old, broken = rows
    assert new["agents"] == ["scripted"] and old["agents"] == ["topk"]
    assert (new["n_runs"], new["successes"], new["success_rate"]) == (5, 2, 0.4)
    assert new["ci95"] == list(wilson(2, 5)) and new["cost_usd"] == 0.75
    assert (new["agent_seconds"], new["grade_seconds"]) == (17.5, 6.2)
    assert new["updated"].startswith("1970-01-01T00:35:00")  # the newest shard file
    assert old["cost_usd"] is None and "error" not in old
    assert "cannot read the results" in broken["error"] and "n_runs" not in broken


def test_detail_is_the_summary_of_every_record(client: TestClient, bench: Bench) -> None:
    d = client.get(f"/api/bench/{NEW}").json()
    records = read_results(bench.new)
    assert len(records) == 5
    assert d["summary"] == as_json(summarize(records))
    assert d["summary"]["outcomes"] == {"success": 2, "wrong": 1, "inconclusive": 1, "invalid": 1}
    assert [{k: v for k, v in r.items() if k != "task_link"} for r in d["records"]] == [
        r.model_dump(mode="json") for r in records]
    assert [r["task_link"] for r in d["records"]] == [
        {"kind": "bench", "id": bench.bench_task}, None,
        {"kind": "investigation", "id": bench.investigation}, None,
        {"kind": "bench", "id": bench.shard_task}]

    # A run's task directory, as an investigation page shows it (also from a shard).
    t = client.get(f"/api/bench/{NEW}/tasks/{bench.bench_task}").json()
    assert t["info"]["question"] == "which component writes red?" and "found it" in t["log_html"]
    assert t["artifacts"] == ["g1-abc123"]
    art = client.get(f"/api/bench/{NEW}/tasks/{bench.bench_task}/artifacts/g1-abc123").json()
    assert art["title"] == "t"
    shard = client.get(f"/api/bench/{NEW}/tasks/{bench.shard_task}").json()
    assert shard["info"]["question"] == "sharded?"


@pytest.mark.parametrize("name", [".hidden", "%2e%2e", "-x", "a%20b", "x" * 130])
def test_bad_names_are_400(client: TestClient, bench: Bench, name: str) -> None:
    res = client.get(f"/api/bench/{name}")
    assert res.status_code == 400 and "bad benchmark results name" in res.json()["error"]


@pytest.mark.parametrize("path", [
    "/api/bench/nope", "/api/bench/no-results",
    "/api/bench/linked",  # a link out of the bench root
    f"/api/bench/{NEW}/tasks/nope", f"/api/bench/{NEW}/tasks/%2e%2e",
    f"/api/bench/{OLD}/tasks/t1-aaa",  # another results directory's task
    "/api/bench/..%2F..%2Fetc", f"/api/bench/{NEW}/tasks/..%2F..%2Finvestigations",
])
def test_unknown_or_outside_is_404(client: TestClient, bench: Bench, path: str) -> None:
    assert client.get(path).status_code == 404


def test_tasks_elsewhere_are_not_served(client: TestClient, bench: Bench) -> None:
    res = client.get(f"/api/bench/{NEW}/tasks/{bench.investigation}")
    assert res.status_code == 404 and "no task directory" in res.json()["error"]
    res = client.get(f"/api/bench/{NEW}/tasks/{bench.bench_task}/artifacts/%2e%2e")
    assert res.status_code == 400
    started = client.get("/api/bench/started").json()  # a run that has not finished one yet
    assert started["summary"]["n_runs"] == 0 and started["records"] == []
    res = client.get(f"/api/bench/{BROKEN}")
    assert res.status_code == 400 and "cannot read the results" in res.json()["error"]


def test_extra_results_directory(bench: Bench, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from spd_mcp.cli import main

    with TestClient(create_app("tales", bench_dirs=[bench.outside])) as c:
        rows = c.get("/api/bench").json()["results"]
        assert [r["name"] for r in rows] == ["outside", NEW, OLD, BROKEN]
        d = c.get("/api/bench/outside").json()
        assert d["summary"]["outcomes"]["wrong"] == 1 and d["path"] == str(bench.outside)
    assert list(extra_bench_dirs([tmp_path / "my results!"])) == ["my-results"]
    with pytest.raises(ValueError, match="both named"):
        extra_bench_dirs([tmp_path / "a" / "r", tmp_path / "b" / "r"])
    assert main(["view", "--bench", str(tmp_path / "none")]) == 2
    assert "no results.jsonl" in capsys.readouterr().err


@pytest.mark.browser
@pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason()))
def test_bench_page_in_chromium(bench: Bench) -> None:
    from spd_mcp.viewer.server import running

    with running(create_app("tales")) as url, browser() as b, local_page(b) as (page, traffic):
        page.goto(url + "#/bench")
        page.wait_for_selector("#bench-table tbody tr")
        assert page.locator("#bench-table tbody tr").count() == 3
        assert "2/5 = 40%" in page.inner_text("#bench-table")
        assert page.get_attribute("nav a.active", "data-nav") == "bench"
        page.click(f"#bench-table a[href='#/bench/{NEW}']")
        page.wait_for_selector("#bench-runs tbody tr")
        outcomes = page.locator("#bench-runs tbody tr").evaluate_all(
            "rows => rows.map(r => r.querySelector('.outcome').className)")
        assert outcomes == [f"outcome {o}" for o in
                            ("success", "wrong", "inconclusive", "invalid", "success")]
        summary = page.inner_text("#bench-summary")
        assert "Success 2/5 = 40%" in summary and "wrong 1" in summary
        assert "/elsewhere/gone-1" in page.inner_text("#bench-runs")  # not linkable: the path
        page.click(f"#bench-runs a[href='#/bench-task/{NEW}/{bench.bench_task}']")
        page.wait_for_selector("#research-log h2")
        assert "found it" in page.inner_text("#research-log")
        assert page.get_attribute("nav a.active", "data-nav") == "bench"
        assert traffic.foreign == [] and traffic.errors == []
