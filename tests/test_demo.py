"""``spd-mcp demo`` end to end: a scripted investigation through the MCP server over stdio fills a
task directory (research log with a saved graph artifact, an explanation, a completed summary)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("run", ["tales", "tales-llama"])
def test_demo_fills_a_task_directory(tmp_path: Path, run: str) -> None:
    root = tmp_path / "tasks"
    env = {**os.environ, "SPD_MCP_HOME": str(tmp_path / "home"), "COLUMNS": "160"}
    proc = subprocess.run([sys.executable, "-m", "spd_mcp.cli", "demo", "--run", run,
                           "--root", str(root)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (task,) = [p for p in root.iterdir() if p.is_dir()]
    assert str(task) in proc.stdout.replace("\n", "")

    log = (task / "research_log.md").read_text()
    refs = re.findall(r"\[\[artifact:([^\]]+)\]\]", log)
    assert refs, log
    assert all((task / "artifacts" / f"{ref}.json").is_file() for ref in refs)

    explanations = [json.loads(line) for line in
                    (task / "explanations.jsonl").read_text().splitlines() if line.strip()]
    assert explanations
    exp = explanations[0]
    assert exp["components"] and all(":" in c["key"] and c["role"] for c in exp["components"])
    types = {e["type"] for e in exp["evidence"]}
    assert {"intervention", "ablation", "graph", "activation_examples"} <= types

    # The explanation's components, ablated everywhere, remove the pronoun (what a grader
    # checks), and the same-size random sets leave it.
    (exp_abl,) = [e for e in exp["evidence"]
                  if e["description"].startswith("ablating this explanation's")]
    assert exp_abl["value"] >= 0.999, exp_abl
    (nec,) = [e for e in exp["evidence"]
              if e["description"].startswith("sweep_ablation's greedy set")]
    assert nec["value"] >= 0.999, nec
    ctrl = float(re.search(r"random same-size alive sets: (-?[\d.]+)%", nec["description"])[1])
    assert ctrl < 5, nec
    assert "sweep_ablation" in log and "necessary" in log.lower()
    # The plan includes a contrastive circuit and patching on a minimal pair (the referent's
    # name swapped to the other gender): the decomposed layers at the name carry the pronoun.
    assert "Contrastive circuit" in log and "with `contrast_token` on the minimal pair" in log
    (patch,) = [e for e in exp["evidence"] if e["type"] == "patching"]
    assert patch["value"] >= 0.9, patch
    assert json.loads((task / "summary.json").read_text())["status"] == "completed"
    assert (task / "server.log").is_file()
