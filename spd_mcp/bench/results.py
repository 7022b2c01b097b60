"""Benchmark results: one graded run per ``results.jsonl`` line, and their summary.

Shared by the runner (``spd-mcp bench``), its report and the viewer's results page.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field


class AgentUsage(BaseModel):
    """What an agent spent: tool calls, errors, turns, tokens, cost, how it ended."""

    tool_calls: int | None = Field(0, description="None: the agent left no transcript")
    tool_errors: int | None = 0
    turns: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None
    agent_exit: str | None = Field(None, description="how the agent ended (its result subtype, "
                                   "a timeout, an error), when it is a separate process")


class RunRecord(AgentUsage):
    """One graded run of one task."""

    task_id: str
    repeat: int
    agent: str
    outcome: str
    success: bool
    reason: str
    components: list[str] = Field(default_factory=list)
    own_drop: float | None = None
    max_other_drop: float | None = None
    random_drop: float | None = None
    agent_seconds: float = 0.0
    grade_seconds: float = 0.0
    task_dir: str = ""


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a success rate k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return round(max(0.0, c - h), 4), round(min(1.0, c + h), 4)


def _total(values: list[Any]) -> Any:
    known = [v for v in values if v is not None]
    return round(sum(known), 6) if known else None


def summarize(records: list[RunRecord]) -> dict[str, Any]:
    """Success rate (with a Wilson interval), outcomes and costs, overall and per task."""
    per: dict[str, list[RunRecord]] = {}
    for r in records:
        per.setdefault(r.task_id, []).append(r)
    k = sum(r.success for r in records)
    return {
        "n_runs": len(records), "successes": k,
        "success_rate": round(k / len(records), 4) if records else 0.0,
        "ci95": wilson(k, len(records)),
        "outcomes": {o: sum(r.outcome == o for r in records)
                     for o in ("success", "wrong", "inconclusive", "invalid")},
        "tool_calls": _total([r.tool_calls for r in records]),
        "tool_errors": _total([r.tool_errors for r in records]),
        "input_tokens": _total([r.input_tokens for r in records]),
        "output_tokens": _total([r.output_tokens for r in records]),
        "cost_usd": _total([r.cost_usd for r in records]),
        "agent_seconds": round(sum(r.agent_seconds for r in records), 1),
        "grade_seconds": round(sum(r.grade_seconds for r in records), 1),
        "tasks": {t: {"success_rate": round(sum(r.success for r in rs) / len(rs), 4),
                      "ci95": wilson(sum(r.success for r in rs), len(rs)),
                      "outcomes": [r.outcome for r in rs],
                      "tool_calls": _total([r.tool_calls for r in rs]),
                      "cost_usd": _total([r.cost_usd for r in rs])}
                  for t, rs in per.items()},
    }


def read_results(out: Path) -> list[RunRecord]:
    """Every record of ``out``/results.jsonl and of its shard directories (``shard-*``)."""
    files = [out / "results.jsonl", *sorted(out.glob("shard-*/results.jsonl"))]
    records: list[RunRecord] = []
    for f in files:
        if f.is_file():
            records += [RunRecord.model_validate_json(line)
                        for line in f.read_text().splitlines() if line.strip()]
    return records
