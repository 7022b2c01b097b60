"""Grade an answer to a benchmark task by causal re-check on held-out probes, never by its text.

The claimed components are ablated everywhere in the full model (the exact target, weight delta
on, their masks 0 at every position) on ``n_probes`` probes of every planted behaviour drawn from
the task's held-out seed. With ``drop = 1 - after / before`` of the task's metric:

- necessity: the task behaviour's drop >= ``threshold``;
- specificity: every other behaviour's drop <= ``tolerance``;
- control: ``n_random`` random sets of the same size per layer, drawn from the components alive
  on the behaviour's probes (none claimed), have a mean drop below ``threshold``;
- size: at most ``budget`` components.

``success`` needs all four; a summary status ``inconclusive`` is its own outcome; an answer the
grader cannot check (no explanation, an unknown key, a task for another run) is ``invalid``.

Feature tasks (``feature: K`` on a toy with known features, :mod:`.toys`) are graded the same
way on held-out inputs of the toy's data distribution with feature K active: each feature is a
"behaviour" (``feature-K``; its score's ``prob_*`` hold the reconstruction ``recon`` and
``acc_*`` the accuracy), the other features are the specificity set, the random sets come from
the components alive on K's probes; a fifth criterion, match, needs every claimed component to
be feature K's known piece (and, for ``complete`` tasks, one in every matrix that has pieces).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from spd_mcp.analysis.features import FeatureMatch, ablation_masks
from spd_mcp.analysis.sweep import random_component_sets
from spd_mcp.errors import SpdMcpError
from spd_mcp.investigation.taskdir import Status, TaskDir
from spd_mcp.keys import ComponentKey
from spd_mcp.model.session import RunSession
from spd_mcp.model.text import Batch, prompt_batch

from . import toys
from .tasks import BenchTask

Outcome = Literal["success", "wrong", "inconclusive", "invalid"]
CHUNK = 128
"""Probes per forward pass."""


class Answer(BaseModel):
    """What an agent handed in: one ``explanations.jsonl`` record and the summary status."""

    model_config = ConfigDict(extra="forbid")
    explanation: dict[str, Any] | None = Field(
        None, description="a saved explanation: components [{key, role}], evidence, ...")
    status: Status = "completed"

    @classmethod
    def from_task_dir(cls, path: Path | str, explanation_id: str | None = None) -> Answer:
        """The task directory's last explanation (or ``explanation_id``) and summary status."""
        td = TaskDir(path)
        records = td.explanations()
        if explanation_id is not None:
            records = [r for r in records if r.get("explanation_id") == explanation_id]
        return cls(explanation=records[-1] if records else None, status=td.summary().status)


class BehaviourScore(BaseModel):
    """One behaviour's metrics on its probes, before and after the ablation."""

    behaviour: str
    n: int
    prob_before: float
    prob_after: float
    acc_before: float
    acc_after: float
    drop: float = Field(description="relative drop of the task's metric")


class ControlScore(BaseModel):
    n_sets: int
    pool: int = Field(description="alive components the sets were drawn from")
    mean_drop: float
    max_drop: float
    n_passing: int = Field(description="random sets whose drop reached the threshold")


class Criterion(BaseModel):
    passed: bool
    value: float
    limit: float
    detail: str


class Scores(BaseModel):
    necessity: Criterion
    specificity: Criterion
    control: Criterion
    size: Criterion
    own: BehaviourScore
    others: list[BehaviourScore]
    random: ControlScore
    match: Criterion | None = Field(
        None, description="feature tasks: the claimed components are the feature's known pieces")
    matches: list[FeatureMatch] | None = Field(
        None, description="feature tasks: each claimed component's best-matching known piece")

    def criteria(self) -> list[tuple[str, Criterion]]:
        """Every criterion the answer is judged on, by name (match only for feature tasks)."""
        extra = [("match", self.match)] if self.match is not None else []
        return [("necessity", self.necessity), ("specificity", self.specificity),
                ("control", self.control), ("size", self.size), *extra]

    def failed(self) -> set[str]:
        """The names of the criteria that did not pass."""
        return {name for name, c in self.criteria() if not c.passed}


class GradeResult(BaseModel):
    task_id: str
    outcome: Outcome
    success: bool
    reason: str
    distributed: bool
    components: list[str] = Field(default_factory=list)
    scores: Scores | None = None
    seconds: float = 0.0


def grade(session: RunSession, task: BenchTask, answer: Answer) -> GradeResult:
    """Grade ``answer`` to ``task`` on ``session``; never raises (a failure is ``invalid``)."""
    start = time.perf_counter()
    try:
        result = _grade(session, task, answer)
    except Exception as e:  # grade() reports every failure as an outcome
        kind = "" if isinstance(e, SpdMcpError) else f"{type(e).__name__}: "
        result = _verdict(task, "invalid", f"cannot grade: {kind}{e}")
    result.seconds = round(time.perf_counter() - start, 3)
    return result


def _verdict(task: BenchTask, outcome: Outcome, reason: str, components: Sequence[str] = (),
             scores: Scores | None = None) -> GradeResult:
    return GradeResult(task_id=task.id, outcome=outcome, success=outcome == "success",
                       reason=reason, distributed=task.distributed,
                       components=list(components), scores=scores)


def _grade(session: RunSession, task: BenchTask, answer: Answer) -> GradeResult:
    if session.run.name != task.run:
        return _verdict(task, "invalid", f"task is for run {task.run!r}, the session holds "
                        f"{session.run.name!r}")
    if task.is_feature:
        problem = toys.check_feature_task(session, task)
        if problem is not None:
            return _verdict(task, "invalid", problem)
    else:
        known = session.behaviours()
        if task.behaviour not in known:
            return _verdict(task, "invalid", f"run {task.run!r} has no planted behaviour "
                            f"{task.behaviour!r}; known: {', '.join(known) or 'none'}")
    inconclusive = answer.status == "inconclusive"
    if answer.explanation is None:
        if inconclusive:
            return _verdict(task, "inconclusive", "summary status is inconclusive; no "
                            "explanation saved")
        return _verdict(task, "invalid", "no explanation saved")
    comps = claimed_components(session, answer.explanation)
    if isinstance(comps, str):
        if inconclusive:
            return _verdict(task, "inconclusive", f"summary status is inconclusive; {comps}")
        return _verdict(task, "invalid", comps)
    names = [str(c) for c in comps]
    score_of = feature_score if task.is_feature else score
    scores = score_of(session, task, comps)
    if inconclusive:
        return _verdict(task, "inconclusive", "summary status is inconclusive", names, scores)
    failed = [f"{k}: {c.detail}" for k, c in scores.criteria() if not c.passed]
    if failed:
        return _verdict(task, "wrong", "; ".join(failed), names, scores)
    return _verdict(task, "success", "all criteria pass", names, scores)


def claimed_components(session: RunSession,
                       explanation: dict[str, Any]) -> list[ComponentKey] | str:
    """The explanation's components, validated against the run (deduplicated, in order), or
    the reason they cannot be graded."""
    raw = explanation.get("components")
    if not isinstance(raw, list) or not raw:
        return "explanation has no components (want a non-empty list of {key, role})"
    out: list[ComponentKey] = []
    for i, c in enumerate(raw):
        key = c.get("key") if isinstance(c, dict) else None
        if not isinstance(key, str):
            return f"components[{i}] has no string 'key'"
        try:
            out.append(session.keys.component(key))
        except SpdMcpError as e:
            return f"components[{i}].key: {e}"
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------- measurement
@dataclass
class ProbeBatches:
    """One behaviour's probes as padded batches with their expected token ids."""

    batches: list[Batch]
    expected: list[Tensor]  # (B,) token ids per batch


def probe_batches(session: RunSession, behaviour: str, seed: int, n: int) -> ProbeBatches:
    """``n`` probes of ``behaviour`` from corpus ``seed`` (memoised on the session)."""
    memo_key = f"bench/probes/{behaviour}/{seed}/{n}"
    if memo_key not in session.memo:
        probes = list(session.behaviours()[behaviour].probes(seed, n))
        batches, expected = [], []
        for lo in range(0, len(probes), CHUNK):
            chunk = probes[lo:lo + CHUNK]
            batches.append(prompt_batch(session, [p.prompt for p in chunk]))
            expected.append(torch.tensor([session.token_id(p.expected) for p in chunk],
                                         device=session.device))
        session.memo[memo_key] = ProbeBatches(batches, expected)
    out: ProbeBatches = session.memo[memo_key]
    return out


@torch.no_grad()
def probe_metrics(session: RunSession, probes: ProbeBatches,
                  comps: Sequence[ComponentKey] = ()) -> tuple[float, float]:
    """(mean expected-token probability, top-1 accuracy) with ``comps`` ablated everywhere."""
    masks = ablation_masks(session, comps)
    delta: dict[str, Tensor | float] = {m: 1.0 for m in masks}
    prob = acc = 0.0
    n = 0
    for batch, expected in zip(probes.batches, probes.expected, strict=True):
        logits = session.cm(batch.ids, masks=masks or None, delta_masks=delta)
        rows = torch.arange(len(expected), device=session.device)
        last = logits[rows, batch.last].float()  # (B, V)
        prob += float(last.softmax(-1)[rows, expected].sum())
        acc += float((last.argmax(-1) == expected).sum())
        n += len(expected)
    return prob / n, acc / n


def _baseline(session: RunSession, behaviour: str, task: BenchTask) -> tuple[float, float]:
    memo_key = f"bench/base/{behaviour}/{task.probe_seed}/{task.n_probes}"
    if memo_key not in session.memo:
        probes = probe_batches(session, behaviour, task.probe_seed, task.n_probes)
        session.memo[memo_key] = probe_metrics(session, probes)
    out: tuple[float, float] = session.memo[memo_key]
    return out


def _drop(before: float, after: float) -> float:
    return 0.0 if before <= 0 else 1.0 - after / before


def behaviour_score(session: RunSession, task: BenchTask, behaviour: str,
                    comps: Sequence[ComponentKey]) -> BehaviourScore:
    """``behaviour`` on the task's held-out probes, before and after ablating ``comps``."""
    probes = probe_batches(session, behaviour, task.probe_seed, task.n_probes)
    pb, ab = _baseline(session, behaviour, task)
    pa, aa = probe_metrics(session, probes, comps)
    drop = _drop(pb, pa) if task.metric == "prob" else _drop(ab, aa)
    return BehaviourScore(behaviour=behaviour, n=sum(len(e) for e in probes.expected),
                          prob_before=round(pb, 5), prob_after=round(pa, 5),
                          acc_before=round(ab, 4), acc_after=round(aa, 4), drop=round(drop, 5))


@torch.no_grad()
def alive_on(session: RunSession, probes: ProbeBatches) -> list[ComponentKey]:
    """Components with natural CI > 0 at some real position of the probes."""
    alive: dict[str, Tensor] = {}
    for batch in probes.batches:
        _, ci = session.cm.ci_for(batch.ids)
        for m, g in ci.lower.items():
            hit = ((g > 0) & batch.mask[..., None]).any(0).any(0)
            alive[m] = alive[m] | hit if m in alive else hit
    return [ComponentKey(session.to_canonical[m], c)
            for m, hit in alive.items() for c in torch.nonzero(hit).flatten().tolist()]


def control_score(session: RunSession, task: BenchTask,
                  comps: Sequence[ComponentKey]) -> ControlScore:
    """Drops of the task behaviour under random same-size sets (per layer) of alive components."""
    probes = probe_batches(session, task.behaviour, task.probe_seed, task.n_probes)
    memo_key = f"bench/alive/{task.behaviour}/{task.probe_seed}/{task.n_probes}"
    if memo_key not in session.memo:
        session.memo[memo_key] = alive_on(session, probes)
    claimed = set(comps)
    pool = [a for a in session.memo[memo_key] if a not in claimed]
    gen = torch.Generator().manual_seed(task.probe_seed)
    sets = random_component_sets(comps, pool, task.n_random, gen)
    pb, ab = _baseline(session, task.behaviour, task)
    drops = []
    for s in sets:
        pa, aa = probe_metrics(session, probes, s)
        drops.append(_drop(pb, pa) if task.metric == "prob" else _drop(ab, aa))
    return ControlScore(n_sets=len(sets), pool=len(pool),
                        mean_drop=round(sum(drops) / len(drops), 5),
                        max_drop=round(max(drops), 5),
                        n_passing=sum(d >= task.threshold for d in drops))


def score(session: RunSession, task: BenchTask, comps: Sequence[ComponentKey]) -> Scores:
    """Every criterion's numbers for ablating ``comps`` (valid keys of the session's run)."""
    own = behaviour_score(session, task, task.behaviour, comps)
    others = [behaviour_score(session, task, b, comps)
              for b in session.behaviours() if b != task.behaviour]
    rnd = control_score(session, task, comps)
    return _scores(task, len(comps), own, others, rnd)


def _scores(task: BenchTask, n: int, own: BehaviourScore, others: list[BehaviourScore],
            rnd: ControlScore) -> Scores:
    """The four criteria from the measured scores of ``n`` claimed components."""
    worst = max(others, key=lambda o: o.drop, default=None)
    worst_drop = worst.drop if worst is not None else 0.0
    worst_name = worst.behaviour if worst is not None else "none"
    return Scores(
        necessity=Criterion(passed=own.drop >= task.threshold, value=own.drop,
                            limit=task.threshold,
                            detail=f"{task.behaviour} drops {own.drop:.3f} (need >= "
                                   f"{task.threshold})"),
        specificity=Criterion(passed=worst_drop <= task.tolerance, value=worst_drop,
                              limit=task.tolerance,
                              detail=f"largest other drop {worst_drop:.3f} ({worst_name}; "
                                     f"allowed <= {task.tolerance})"),
        control=Criterion(passed=rnd.mean_drop < task.threshold, value=rnd.mean_drop,
                          limit=task.threshold,
                          detail=f"random same-size sets drop {rnd.mean_drop:.3f} on average "
                                 f"(must stay below {task.threshold})"),
        size=Criterion(passed=n <= task.budget, value=float(n), limit=float(task.budget),
                       detail=f"{n} components (budget {task.budget})"),
        own=own, others=others, random=rnd)


# ----------------------------------------------------------------------------- feature tasks
def _feature_behaviour(session: RunSession, task: BenchTask, feature: int,
                       comps: Sequence[ComponentKey]) -> BehaviourScore:
    """Feature ``feature`` on its held-out probes, before and after ablating ``comps``."""
    probes = toys.feature_probes(session, task.probe_seed, task.n_probes)[feature]
    rb, ab = toys.baseline(session, task, feature)
    ra, aa = toys.recon_metrics(session, probes, feature, comps)
    drop = _drop(ab, aa) if task.metric == "accuracy" else _drop(rb, ra)
    return BehaviourScore(behaviour=f"feature-{feature}", n=len(probes), prob_before=round(rb, 5),
                          prob_after=round(ra, 5), acc_before=round(ab, 4),
                          acc_after=round(aa, 4), drop=round(drop, 5))


def feature_score(session: RunSession, task: BenchTask, comps: Sequence[ComponentKey]) -> Scores:
    """Every criterion of a feature task, the ground-truth match included."""
    assert task.feature is not None
    n_features = toys.feature_probes(session, task.probe_seed, task.n_probes).shape[0]
    own = _feature_behaviour(session, task, task.feature, comps)
    others = [_feature_behaviour(session, task, f, comps)
              for f in range(n_features) if f != task.feature]
    claimed = set(comps)
    pool = [a for a in toys.alive_on_feature(session, task) if a not in claimed]
    sets = random_component_sets(comps, pool, task.n_random,
                                 torch.Generator().manual_seed(task.probe_seed))
    drops = [_feature_behaviour(session, task, task.feature, s).drop for s in sets]
    rnd = ControlScore(n_sets=len(sets), pool=len(pool),
                       mean_drop=round(sum(drops) / len(drops), 5), max_drop=round(max(drops), 5),
                       n_passing=sum(d >= task.threshold for d in drops))
    passed, worst, detail, matches = toys.match_verdict(session, task, comps)
    match = Criterion(passed=passed, value=worst, limit=task.match_threshold, detail=detail)
    return _scores(task, len(comps), own, others, rnd).model_copy(
        update={"match": match, "matches": matches})
