"""Responsiveness of the viewer's graph page in real headless Chromium (Debian's, via Playwright).

    python benchmarks/viewer.py [--edges 3000] [--hovers 30]

Computes one natural graph of a long ``tales`` prompt through the viewer's API (a temporary
SPD_MCP_HOME), then in the browser measures, for a large view (``--edges``, at least 2,000) and
for the artifact-sized baseline (300 edges) drawn on the same page:

- ``first_render_ms``: ``renderGraph`` until layout is done and the next frame is painted
  (performance.now() before the call, after two requestAnimationFrame callbacks);
- ``hover_ms``: a ``mouseover`` dispatched on a node until a non-neighbour edge's effective
  opacity (its own times its ancestors') has changed, measured at the next animation frame
  (p50 / p95 over ``--hovers`` nodes);
- ``page_load_ms``: navigating to the graph page with the graph's id until the SVG is ready
  (fetch + JSON + render), for the large view.

Prints one JSON object, with the large view's numbers also as ratios to the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

PROMPT = ("once upon a time , a kind girl named mia lived in a cottage . mia had a friend called "
          "tom . tom walked to the park , and there he found a red ball . the ball was")

MEASURE = """async ([art, hovers]) => {
  const frame = () => new Promise((r) => requestAnimationFrame(() => r()));
  const box = document.createElement('div');
  box.className = 'graph-wrap';
  document.getElementById('view').replaceChildren(box);
  await frame();
  const t0 = performance.now();
  const ctl = window.SPDGraph.renderGraph(box, art, {});
  ctl.svg.getBoundingClientRect();
  await frame(); await frame();
  const firstRender = performance.now() - t0;
  const nodes = [...ctl.svg.querySelectorAll('circle.node')];
  const total = ctl.edges.length;
  const edgeEl = (i) => ctl.base.querySelector(`path.edge[data-i="${i}"]`);
  const degree = (n) => ctl.neighbours(n.dataset.key).length;
  const usable = nodes.filter((n) => degree(n) > 0 && degree(n) < total);
  const step = Math.max(1, Math.floor(usable.length / hovers));
  const picks = usable.filter((_, i) => i % step === 0).slice(0, hovers);
  const times = [];
  for (const n of picks) {
    const nb = new Set(ctl.neighbours(n.dataset.key));
    let far = 0; while (nb.has(far)) far++;
    const el = edgeEl(far);
    const eff = () => {
      let o = 1;
      for (let x = el; x; x = x.parentElement) o *= Number(getComputedStyle(x).opacity);
      return o;
    };
    const before = eff();
    const t = performance.now();
    n.dispatchEvent(new MouseEvent('mouseover', { bubbles: true }));
    await frame();
    const changed = eff() !== before;
    times.push(changed ? performance.now() - t : NaN);
    n.dispatchEvent(new MouseEvent('mouseout', { bubbles: true }));
    await frame();
  }
  return { firstRender, times, nodes: nodes.length, edges: total };
}"""


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edges", type=int, default=3000, help="edges in the large view (>= 2000)")
    ap.add_argument("--hovers", type=int, default=30)
    args = ap.parse_args()
    os.environ["SPD_MCP_HOME"] = tempfile.mkdtemp(prefix="spd-viewer-bench-")

    import httpx

    from spd_mcp.viewer.app import create_app
    from spd_mcp.viewer.server import running
    from tests.viewer_browser import browser, local_page, missing_reason

    why = missing_reason()
    if why:
        raise SystemExit(f"cannot benchmark the viewer: {why}")
    out: dict[str, object] = {"prompt_tokens": len(PROMPT.split()) + 1}
    with running(create_app("tales")) as url, httpx.Client(base_url=url, timeout=600) as http:
        t0 = time.perf_counter()
        job = http.post("/api/runs/tales/graphs", json={"text": PROMPT}).json()
        while job["status"] == "running":
            time.sleep(0.1)
            job = http.get(f"/api/jobs/{job['id']}").json()
        assert job["status"] == "done", job
        out["graph_compute_s"] = round(time.perf_counter() - t0, 2)
        gid = job["result"]["graph_id"]
        out["stored_edges"] = job["result"]["n_edges"]
        arts = {name: http.get(f"/api/runs/tales/graphs/{gid}?max_edges={n}").json()
                for name, n in (("baseline", 300), ("large", args.edges))}
        with browser() as b, local_page(b) as (page, traffic):
            page.goto(url + "#/runs")
            page.wait_for_selector("#runs-table")
            for name, art in arts.items():
                r = page.evaluate(MEASURE, [art, args.hovers])
                ok = [t for t in r["times"] if t == t]  # NaN: the style did not change
                out[name] = {"nodes": r["nodes"], "edges": r["edges"],
                             "first_render_ms": round(r["firstRender"], 1),
                             "hover_ms_p50": round(statistics.median(ok), 2) if ok else None,
                             "hover_ms_p95": round(pct(ok, 0.95), 2) if ok else None,
                             "hovers": len(r["times"]), "hovers_without_change":
                             len(r["times"]) - len(ok)}
            page.goto(url + "#/graph")
            page.wait_for_selector("#max-edges")
            page.fill("#max-edges", str(args.edges))
            page.fill("#prompt", PROMPT)
            page.fill("#target-token", "")
            t1 = time.perf_counter()
            page.click("#compute")  # cached: the stored graph is fetched and drawn
            page.wait_for_function("n => document.querySelectorAll('#graph path.edge')"
                                   ".length >= n", arg=min(args.edges, out["stored_edges"]),
                                   timeout=120_000)
            out["page_load_ms"] = round((time.perf_counter() - t1) * 1000, 1)
            out["requests_left_127.0.0.1"] = len(traffic.foreign)
    large, base = out["large"], out["baseline"]
    assert isinstance(large, dict) and isinstance(base, dict)
    out["ratio_first_render"] = round(large["first_render_ms"] / base["first_render_ms"], 2)
    if large["hover_ms_p50"] and base["hover_ms_p50"]:
        out["ratio_hover_p50"] = round(large["hover_ms_p50"] / base["hover_ms_p50"], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
