"""Feature tasks on toys with known features (TMS): held-out feature probes, the reconstruction
metrics and the ground-truth match. :mod:`.grade` turns them into :class:`~.grade.Scores`.

A probe of feature K is an input from the toy's own data distribution (its sampler, seeded with
the task's ``probe_seed``) in which feature K is active; the model's output K reconstructs it.
On a batch of K's probes with the claimed components ablated (weight delta kept):

- ``recon`` = max(0, 1 − Σ(y_K − x_K)² / Σ x_K²), how much of feature K the output recovers;
- ``accuracy`` = the fraction of probes whose output reaches half the feature's value,
  sign(x_K)·y_K ≥ |x_K| / 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from spd_mcp.analysis.features import (
    FeatureMatch,
    ablated_output,
    feature_toy,
    match_features,
)
from spd_mcp.errors import AnalysisError
from spd_mcp.keys import ComponentKey
from spd_mcp.model.session import RunSession

from .tasks import BenchTask

DRAW = 4096
"""Inputs drawn from the sampler at a time while collecting probes."""
MAX_DRAWS = 256
"""Draws before a feature that is (almost) never active is an error."""


def check_feature_task(session: RunSession, task: BenchTask) -> str | None:
    """Why ``task`` cannot be graded on ``session`` (None: it can); names the task field."""
    toy = feature_toy(session)
    if toy is None:
        return (f"task field 'feature': run {session.run.name!r} has no known input features "
                "(feature tasks need a toy such as 'tms-5-2')")
    assert task.feature is not None
    if task.feature >= toy.n_features:
        return (f"task field 'feature': {task.feature} is not a feature of run "
                f"{session.run.name!r} (it has {toy.n_features}: 0..{toy.n_features - 1})")
    return None


@torch.no_grad()
def feature_probes(session: RunSession, seed: int, n: int) -> Tensor:
    """(F, n, F): for each of the F features, ``n`` inputs of the toy's data distribution in
    which it is active, drawn with ``seed`` on the CPU (memoised on the session)."""
    memo_key = f"bench/feature-probes/{seed}/{n}"
    if memo_key in session.memo:
        found: Tensor = session.memo[memo_key]
        return found
    toy = feature_toy(session)
    if toy is None:
        raise AnalysisError(f"run {session.run.name!r} has no known input features")
    F = toy.n_features
    rows: list[list[Tensor]] = [[] for _ in range(F)]
    counts = [0] * F
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(MAX_DRAWS):
            x = session.run.target.sampler(DRAW, "cpu").float()
            for f in range(F):
                if counts[f] < n:
                    hit = x[x[:, f] != 0][: n - counts[f]]
                    rows[f].append(hit)
                    counts[f] += len(hit)
            if min(counts) >= n:
                break
    if min(counts) < n:
        rare = [f for f in range(F) if counts[f] < n]
        raise AnalysisError(f"features {rare} were active in fewer than {n} of "
                            f"{MAX_DRAWS * DRAW} sampled inputs")
    out = torch.stack([torch.cat(r) for r in rows]).to(session.device)
    session.memo[memo_key] = out
    return out


@torch.no_grad()
def recon_metrics(session: RunSession, x: Tensor, feature: int,
                  comps: Sequence[ComponentKey] = ()) -> tuple[float, float]:
    """(recon, accuracy) of ``feature`` on inputs ``x`` (B, F) with ``comps`` ablated."""
    y = ablated_output(session, x, comps)[:, feature].float()
    t = x[:, feature].float()
    recon = 1.0 - float((y - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12))
    acc = float((torch.sign(t) * y >= t.abs() / 2).float().mean())
    return max(0.0, recon), acc


def baseline(session: RunSession, task: BenchTask, feature: int) -> tuple[float, float]:
    """:func:`recon_metrics` of the target on ``feature``'s probes (memoised)."""
    memo_key = f"bench/feature-base/{feature}/{task.probe_seed}/{task.n_probes}"
    if memo_key not in session.memo:
        probes = feature_probes(session, task.probe_seed, task.n_probes)
        session.memo[memo_key] = recon_metrics(session, probes[feature], feature)
    out: tuple[float, float] = session.memo[memo_key]
    return out


@torch.no_grad()
def alive_on_feature(session: RunSession, task: BenchTask) -> list[ComponentKey]:
    """Components with natural CI > 0 on some probe of the task's feature (memoised)."""
    assert task.feature is not None
    memo_key = f"bench/feature-alive/{task.feature}/{task.probe_seed}/{task.n_probes}"
    if memo_key not in session.memo:
        x = feature_probes(session, task.probe_seed, task.n_probes)[task.feature]
        _, ci = session.cm.ci_for(x)
        session.memo[memo_key] = [
            ComponentKey(session.to_canonical[m], c) for m, g in ci.lower.items()
            for c in torch.nonzero((g > 0).any(0)).flatten().tolist()]
    out: list[ComponentKey] = session.memo[memo_key]
    return out


def match_verdict(session: RunSession, task: BenchTask, comps: Sequence[ComponentKey]
                  ) -> tuple[bool, float, str, list[FeatureMatch]]:
    """Whether every claimed component is the task feature's known piece (|cosine| ≥
    ``match_threshold``) and, for ``complete`` tasks, every matrix with pieces is covered:
    (passed, the smallest |cosine| to the feature, detail, matches)."""
    toy = feature_toy(session)
    assert toy is not None and task.feature is not None
    matches = match_features(session, comps)
    bad = []
    worst = 1.0
    for m in matches:
        cos = m.cosine if m.feature == task.feature else 0.0
        worst = min(worst, cos)
        if m.feature is None:
            bad.append(f"{m.key}: its matrix has no known feature pieces")
        elif m.feature != task.feature:
            bad.append(f"{m.key} is feature {m.feature}'s (|cos| {m.cosine:.2f})")
        elif m.cosine < task.match_threshold:
            bad.append(f"{m.key} matches feature {m.feature} with |cos| {m.cosine:.2f} only")
    if task.complete:
        covered = {k.layer for k, m in zip(comps, matches, strict=True)
                   if m.feature == task.feature}
        missing = [la for la in toy.truth if la not in covered]
        if missing:
            bad.append(f"no component named in {', '.join(missing)}")
    detail = (f"every component is feature {task.feature}'s known piece (|cos| >= "
              f"{task.match_threshold})" if not bad else "; ".join(bad))
    return not bad, round(worst, 4), detail, matches
