"""The viewer in real headless Chromium (Debian's, driven by Playwright): every page stays on
127.0.0.1, the graph page draws what the analysis layer says, hover spotlight, signed/abs toggle,
interventions under four regimes, the demo investigation's inline graph, and an inert malicious
log. Screenshots go to ``$SPD_MCP_SCREENSHOTS`` (default ``out/screenshots``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.viewer_browser import browser, local_page, missing_reason, stored_graph

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason()))]
ROOT = Path(__file__).parents[1]
SHOTS = Path(os.environ.get("SPD_MCP_SCREENSHOTS", ROOT / "out" / "screenshots"))
THRESHOLD = 0.3


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory for the module, filled by ``spd-mcp demo`` (a harvest, a stored
    optimised graph and a finished investigation with a graph artifact)."""
    home = tmp_path_factory.mktemp("viewer_home")
    env = {**os.environ, "SPD_MCP_HOME": str(home), "COLUMNS": "160"}
    proc = subprocess.run([sys.executable, "-m", "spd_mcp.cli", "demo"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return home


@pytest.fixture(autouse=True)
def _module_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPD_MCP_HOME", str(home))


@pytest.fixture(scope="module")
def session() -> Any:
    from spd_mcp.model.session import RunSession

    return RunSession.load("tales")


@pytest.fixture(scope="module")
def url(home: Path, session: Any) -> Iterator[str]:
    from spd_mcp.viewer.app import create_app
    from spd_mcp.viewer.server import running

    with running(create_app("tales", session=session)) as base:
        yield base


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    with browser() as b:
        yield b


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    with local_page(chromium) as (pg, traffic):
        yield pg
        assert traffic.foreign == [], f"requests left 127.0.0.1: {traffic.foreign}"
        assert traffic.local, "the page made no requests at all"
        assert traffic.errors == [], traffic.errors


def shot(page: Any, name: str, full: bool = True) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full)


def demo_task(home: Path) -> Path:
    (task,) = [p for p in (home / "investigations").iterdir() if (p / "task.json").is_file()
               and json.loads((p / "task.json").read_text())["launcher"]["kind"] == "demo"]
    return task


def open_graph(page: Any, url: str) -> int:
    """Compute the default (planted-behaviour) prompt's natural graph; set the CI threshold."""
    page.goto(url + "#/graph")
    page.wait_for_selector("#compute")
    page.click("#compute")
    page.wait_for_selector("svg.graph[data-ready]", timeout=120_000)
    page.fill("#ci-threshold", str(THRESHOLD))
    page.wait_for_function("t => document.querySelector('#graph-counts').textContent"
                           ".includes('CI > ' + t)", arg=f"{THRESHOLD:.2f}", timeout=30_000)
    page.wait_for_selector("svg.graph[data-ready]")
    return int(page.get_attribute("svg.graph", "data-graph-id"))


def expected_view(session: Any, gid: int) -> Any:
    """What the analysis layer says about the stored graph at the same threshold."""
    from spd_mcp.analysis.graph_view import view_graph

    g = stored_graph(session, gid)
    return view_graph(session, gid, g, ci_threshold=THRESHOLD, top_k=2000)


def test_every_page_loads_locally(page: Any, url: str, home: Path) -> None:
    page.goto(url + "#/runs")
    page.wait_for_selector("#runs-table tbody tr")
    assert "tales" in page.inner_text("#runs-table")
    page.wait_for_selector("section.card h2")
    shot(page, "viewer-runs")
    page.goto(url + "#/graph")
    page.wait_for_selector("#compute")
    page.goto(url + "#/interventions")
    page.wait_for_selector("#run-intervention")
    page.goto(url + "#/investigations")
    page.wait_for_selector("#inv-table tbody tr")
    assert "completed" in page.inner_text("#inv-table")
    shot(page, "viewer-investigations")
    page.goto(url + f"#/investigation/{demo_task(home).name}")
    page.wait_for_selector("#research-log")


def test_graph_page_matches_the_analysis_layer(page: Any, url: str, session: Any) -> None:
    gid = open_graph(page, url)
    view = expected_view(session, gid)
    n_nodes = page.locator("svg.graph circle.node").count()
    n_edges = page.locator("#graph path.edge").count()
    assert (n_nodes, n_edges) == (len(view.nodes), len(view.edges))
    assert len(view.edges) == min(view.n_edges_matching, 2000) > 50  # the page's default cap
    assert page.get_attribute("#max-edges", "value") == "2000"
    shot(page, "viewer-graph-natural", full=False)


def test_hover_spotlights_neighbours(page: Any, url: str) -> None:
    open_graph(page, url)
    key, near, far = page.evaluate("""() => {
        const svg = document.querySelector('svg.graph');
        const nodes = [...svg.querySelectorAll('circle.node')];
        const ctl = window.SPDGraph.last;
        const total = ctl.edges.length;
        let best = null;
        for (const n of nodes) {
            const nb = ctl.neighbours(n.dataset.key);
            if (nb.length > 0 && nb.length < total && (!best || nb.length > best[1].length))
                best = [n.dataset.key, nb];
        }
        const far = [...Array(total).keys()].find(i => !best[1].includes(i));
        return [best[0], best[1][0], far];
    }""")
    # Effective opacity: the edge's own times its ancestors' (the whole edge layer is dimmed).
    opacity = """sel => { let el = document.querySelector(sel), o = 1;
        while (el) { o *= Number(getComputedStyle(el).opacity); el = el.parentElement; }
        return o; }"""
    far_sel = f'#graph path.edge[data-i="{far}"]'
    assert page.evaluate(opacity, far_sel) == 1.0
    page.locator(f'circle.node[data-key="{key}"]').hover()
    page.wait_for_selector("svg.graph.spot")
    assert page.evaluate(opacity, far_sel) < 0.1
    lit = page.evaluate("k => window.SPDGraph.last.neighbours(k).length", key)
    assert page.locator("#graph path.edge-hl").count() == lit
    assert page.evaluate(opacity, f'#graph path.edge-hl[data-i="{near}"]') == 1.0
    shot(page, "viewer-graph-hover", full=False)
    page.mouse.move(2, 2)
    page.wait_for_selector("svg.graph:not(.spot)")
    assert page.evaluate(opacity, far_sel) == 1.0


def test_signed_abs_toggle_recolours_edges(page: Any, url: str) -> None:
    open_graph(page, url)
    strokes = "() => [...document.querySelectorAll('#graph path.edge')]" \
              ".map(e => e.getAttribute('stroke') + e.getAttribute('stroke-opacity'))"
    flips = page.evaluate("() => window.SPDGraph.last.edges"
                          ".filter(e => (e.value >= 0) !== (e.value_abs >= 0)).length")
    assert flips > 0  # the prompt has edges into negative targets
    before = page.evaluate(strokes)
    page.check("#edge-abs")
    page.wait_for_selector("svg.graph[data-edge-kind=abs]")
    after = page.evaluate(strokes)
    assert len(before) == len(after) and before != after
    page.check("#edge-signed")
    page.wait_for_selector("svg.graph[data-edge-kind=signed]")
    assert page.evaluate(strokes) == before


def test_node_card_and_interventions(page: Any, url: str) -> None:
    open_graph(page, url)
    comps = page.evaluate("() => [...document.querySelectorAll('svg.graph circle.node')]"
                          ".map(n => n.dataset.key).filter(k => !/^(embed|output):/.test(k))")
    # Pin the two component nodes with the most edges (the hover info bar must not cover them).
    comps.sort(key=lambda k: -page.evaluate("k => window.SPDGraph.last.neighbours(k).length", k))
    for key in comps[:2]:
        page.locator(f'circle.node[data-key="{key}"]').click()
    page.wait_for_selector("#node-card .chip")  # harvest from the demo: top tokens
    assert "fires on" in page.inner_text("#node-card")
    assert page.locator("svg.graph circle.node.pinned").count() == 2
    page.click("#to-interventions")
    page.wait_for_selector("#run-intervention")
    label = page.input_value("#iv-label")
    assert label  # the planted behaviour's expected token, carried over from the graph page
    page.fill("#pgd-steps", "5")
    page.check("#ablate-rest")
    page.click("#run-intervention")
    page.wait_for_selector("#iv-table", timeout=120_000)
    heads = [h.strip() for h in page.locator("#iv-table thead th").all_inner_texts()]
    assert heads == ["position", "target model", "ci", "stochastic", "adversarial", "ablated"]
    cells = page.locator("#iv-table td.preds")
    n_rows = page.locator("#iv-table tbody tr").count()
    assert cells.count() == 5 * n_rows > 0
    # The label token is marked in every cell: in the top-k, or shown below it.
    marked = page.evaluate("() => [...document.querySelectorAll('#iv-table td.preds')]"
                           ".map(td => td.querySelector('.label-token')?.textContent ?? '')")
    assert all(label in m for m in marked)
    assert page.locator("#iv-table .label-token.outside").count() > 0
    assert "ablated" in page.inner_text("#iv-summary")
    shot(page, "viewer-interventions")
    page.locator("#iv-table tbody tr").last.scroll_into_view_if_needed()
    shot(page, "viewer-interventions-last", full=False)


def test_demo_investigation_renders_its_graph_inline(page: Any, url: str, home: Path) -> None:
    task = demo_task(home)
    (art_file,) = (task / "artifacts").glob("*.json")
    art = json.loads(art_file.read_text())
    page.goto(url + f"#/investigation/{task.name}")
    page.wait_for_selector(f'#research-log .artifact svg.graph[data-artifact="{art_file.stem}"]')
    assert page.locator("#research-log .artifact circle.node").count() == len(art["nodes"])
    assert page.locator("#research-log .artifact path.edge").count() == len(art["edges"])
    assert page.locator("article.explanation").count() == 1
    assert page.locator("#timeline li").count() >= 5
    assert page.inner_text("#inv-status") == "completed"
    shot(page, "viewer-investigation")
    page.locator("#research-log .artifact").scroll_into_view_if_needed()
    page.evaluate("() => window.scrollBy(0, -170)")
    shot(page, "viewer-investigation-graph", full=False)


def test_malicious_research_log_is_inert(page: Any, url: str) -> None:
    from spd_mcp.investigation.taskdir import create_task

    td = create_task("tales", "inert?", launcher={"kind": "test"})
    td.append_log("<script>window.__pwned = 1; alert('x')</script>\n\n"
                  "[click me](javascript:window.__pwned=2) "
                  "<a href=\"javascript:window.__pwned=3\">raw</a> "
                  "<img src=x onerror=\"window.__pwned=4\"> "
                  "[data](data:text/html,<script>alert(1)</script>)", "Evil")
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(url + f"#/investigation/{td.path.name}")
    page.wait_for_selector("#research-log h2")
    for link in page.locator("#research-log a").all():
        link.click()
    assert page.locator("#research-log script, #research-log img").count() == 0
    assert page.evaluate("() => window.__pwned") is None and dialogs == []
    text = page.inner_text("#research-log")
    assert "<script>" in text and "javascript:window.__pwned=2" in text


def test_running_investigation_refreshes_live(page: Any, url: str) -> None:
    from spd_mcp.investigation.taskdir import create_task

    td = create_task("tales", "live?", launcher={"kind": "test"})
    td.append_log("first finding", "First")
    page.goto(url + f"#/investigation/{td.path.name}")
    page.wait_for_selector("#research-log h2")
    assert page.inner_text("#inv-status") == "in progress"
    td.append_log("second finding", "Second")
    td.set_summary("Live one", "done", "completed")
    page.wait_for_function("() => document.querySelector('#research-log').textContent"
                           ".includes('second finding')", timeout=10_000)
    page.wait_for_selector("#inv-status:has-text('completed')")
    assert "Live one" in page.inner_text("h1")
