"""Answers and verdict helpers shared by the bench grader tests."""

from __future__ import annotations

from spd_mcp.bench import Answer
from spd_mcp.bench.grade import GradeResult


def answer(keys: list[str], status: str = "completed") -> Answer:
    """An answer claiming ``keys``, with the summary ``status``."""
    return Answer.model_validate({"status": status, "explanation": {
        "explanation_id": "exp-001-abcd", "behaviour": "b",
        "components": [{"key": k, "role": "r"} for k in keys],
        "evidence": [{"type": "ablation", "description": "d", "value": -0.5}],
        "confidence": 0.8}})


def failed(r: GradeResult) -> set[str]:
    """The criteria ``r`` failed (it must have been scored)."""
    assert r.scores is not None
    return r.scores.failed()
