"""Interventions on a node set S under four regimes (DESIGN §6).

With the alive set A (natural CI > 0) and the node set S (components at positions):
- ``ci``: mask 1 on S, 0 elsewhere, no weight delta;
- ``stochastic``: mask 1 on S, s ~ U(0, 1) elsewhere (delta mask too), averaged over samples;
- ``adversarial``: mask 1 on S, PGD-chosen sources in [0, 1] on A \\ S and on the delta (maximising
  the loss), 0 on dead components;
- ``ablated``: the exact target (all masks 1, delta on) with only the nodes in S set to 0.
The loss context is explicit: ``kl`` (mean KL(target ‖ regime) over positions) or ``label``
(cross-entropy of a label token at one position).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import Tensor

from spd_mcp.errors import AnalysisError
from spd_mcp.keys import NodeKey
from spd_mcp.model.losses import pgd_sources
from spd_mcp.model.session import RunSession

from .sweep import LabelMetrics

Regime = Literal["ci", "stochastic", "adversarial", "ablated"]
REGIMES: tuple[Regime, ...] = ("ci", "stochastic", "adversarial", "ablated")
LossContext = Literal["kl", "label"]


class TokenProb(BaseModel):
    token: str
    token_id: int
    prob: float


class PositionPredictions(BaseModel):
    pos: int
    input_token: str
    target: list[TokenProb]
    regimes: dict[str, list[TokenProb]] = Field(description="regime → top-k predictions")
    label: dict[str, float] | None = Field(
        None, description="label-token probability per regime (and 'target') at this position"
    )


class RegimeSpread(BaseModel):
    prob_mean: float
    prob_min: float
    prob_max: float
    logprob_mean: float


class ControlSummary(BaseModel):
    """The same regimes on random same-size sets of alive nodes (per layer and position)."""

    n: int
    label: dict[str, RegimeSpread] | None = Field(
        None, description="regime → label probability over the control sets")
    loss_mean: dict[str, float] = Field(description="regime → mean loss over the control sets")
    sets: list[list[str]] = Field(description="the first 3 control sets")


class InterventionResult(BaseModel):
    tokens: list[str]
    n_nodes: int
    loss_context: LossContext
    label_token: str | None
    label_position: int | None
    loss: dict[str, float] = Field(description="regime → loss (KL in nats/token, or CE in nats)")
    label_prob: dict[str, float] | None = Field(
        None, description="label-token probability at the label position per regime and target"
    )
    contrast_token: str | None = None
    label_metrics: dict[str, LabelMetrics] | None = Field(
        None, description="regime (and target) → label prob, log-prob, logit and logit "
        "difference against contrast_token (probabilities saturate; log-prob and logits do not)")
    controls: ControlSummary | None = None
    predictions: list[PositionPredictions]
    notes: list[str] = []


def node_masks(
    session: RunSession, nodes: Sequence[NodeKey], T: int
) -> dict[str, Tensor]:
    """Module path → (1, T, C) float mask with 1 on the given component nodes."""
    masks = {
        m: torch.zeros(1, T, C, device=session.device) for m, C in session.cm.Cs.items()
    }
    for n in nodes:
        if n.layer in ("embed", "output"):
            raise AnalysisError(f"node {n} is not a component node; interventions take components")
        masks[session.to_module[n.layer]][0, n.pos, n.index] = 1.0
    return masks


def _log_probs(logits: Tensor) -> Tensor:
    return F.log_softmax(logits.float(), dim=-1)


def _topk(session: RunSession, probs: Tensor, k: int) -> list[TokenProb]:
    p, i = probs.topk(k)
    return [
        TokenProb(token=session.token_str(t), token_id=t, prob=round(v, 6))
        for v, t in zip(p.tolist(), i.tolist(), strict=True)
    ]


def random_node_sets(nodes: Sequence[NodeKey], alive: Sequence[NodeKey], Cs: dict[str, int],
                     k: int, gen: torch.Generator) -> tuple[list[list[NodeKey]], bool]:
    """``k`` random sets drawing, for each (layer, position) of ``nodes``, as many nodes outside
    ``nodes``: alive ones first, then dead ones where too few are alive; and whether alive
    nodes sufficed everywhere."""
    chosen = set(nodes)
    want: dict[tuple[str, int], int] = {}
    for n in nodes:
        want[(n.layer, n.pos)] = want.get((n.layer, n.pos), 0) + 1
    pool: dict[tuple[str, int], list[NodeKey]] = {g: [] for g in want}
    for a in alive:
        if a not in chosen and (a.layer, a.pos) in want:
            pool[(a.layer, a.pos)].append(a)
    full = all(len(pool[g]) >= w for g, w in want.items())
    sets = []
    for _ in range(k):
        drawn: list[NodeKey] = []
        for (layer, pos), w in want.items():
            options = pool[(layer, pos)]
            drawn += [options[i] for i in torch.randperm(len(options), generator=gen)[:w].tolist()]
            short = w - min(w, len(options))
            if short:  # too few alive: dead components at this (layer, position)
                taken = chosen | set(options)
                dead = [c for c in torch.randperm(Cs[layer], generator=gen).tolist()
                        if NodeKey(layer, pos, c) not in taken][:short]
                drawn += [NodeKey(layer, pos, c) for c in dead]
        sets.append(drawn)
    return sets, full


def _metrics(lp: Tensor, logits: Tensor, label: int, contrast: int | None) -> LabelMetrics:
    """Label metrics from one position's log-probs and (mean) logits (V,)."""
    return LabelMetrics(
        prob=round(float(lp[label].exp()), 6), logprob=round(float(lp[label]), 5),
        logit=round(float(logits[label]), 5),
        logit_diff=None if contrast is None else round(float(logits[label] - logits[contrast]),
                                                       5))


def _regimes(
    session: RunSession, x: Tensor, S: dict[str, Tensor], alive: dict[str, Tensor],
    regimes: Sequence[Regime], loss_rows: Callable[[Tensor], Tensor], n_samples: int,
    pgd_steps: int, pgd_step_size: float, progress: Callable[[], None] | None,
) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Regime → (log of sample-mean probs (B, T, V), mean logits (B, T, V), losses (B,)) for
    the B node sets in ``S`` (module → (B, T, C)); rows are independent (PGD included)."""
    cm = session.cm
    B, T = next(iter(S.values())).shape[:2]
    xb = x.expand(B, T)
    out: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    for regime in regimes:
        if regime == "ci":
            logits = cm(xb, masks=S).float()
            lp = F.log_softmax(logits, -1)
            out[regime] = (lp, logits, loss_rows(lp))
        elif regime == "ablated":
            logits = cm(xb, masks={m: 1.0 - s for m, s in S.items()},
                        delta_masks={m: 1.0 for m in S}).float()
            lp = F.log_softmax(logits, -1)
            out[regime] = (lp, logits, loss_rows(lp))
        elif regime == "stochastic":
            n = n_samples
            xs = x.expand(B * n, T)
            masks = {m: (s + (1 - s) * torch.rand(n, B, T, s.shape[-1], device=x.device)
                         ).reshape(n * B, T, -1) for m, s in S.items()}
            dm = {m: torch.rand(n * B, T, device=x.device) for m in S}
            logits = cm(xs, masks=masks, delta_masks=dm).float().reshape(n, B, T, -1)
            lps = F.log_softmax(logits, -1)
            losses = loss_rows(lps.reshape(n * B, T, -1)).reshape(n, B).mean(0)
            out[regime] = (lps.exp().mean(0).log(), logits.mean(0), losses)
        elif regime == "adversarial":

            def adv_loss(src: dict[str, Tensor], dsrc: dict[str, Tensor] | None) -> Tensor:
                masks = {m: S[m] + (1 - S[m]) * alive[m] * src[m] for m in S}
                assert dsrc is not None
                return loss_rows(F.log_softmax(cm(xb, masks=masks, delta_masks=dsrc).float(),
                                               -1)).sum()

            with torch.enable_grad():
                src, dsrc = pgd_sources(
                    adv_loss, S, steps=pgd_steps, step_size=pgd_step_size, init="random",
                    shared=False, include_delta=True,
                )
            masks = {m: S[m] + (1 - S[m]) * alive[m] * src[m] for m in S}
            logits = cm(xb, masks=masks, delta_masks=dsrc).float()
            lp = F.log_softmax(logits, -1)
            out[regime] = (lp, logits, loss_rows(lp))
        else:
            raise AnalysisError(f"unknown regime {regime!r}; valid: {', '.join(REGIMES)}")
        if progress is not None:
            progress()
    return out


CONTROL_BATCH = 16
"""Control sets per batched forward."""


@torch.no_grad()
def run_intervention(
    session: RunSession,
    ids: list[int],
    nodes: Sequence[NodeKey],
    *,
    regimes: Sequence[Regime] = REGIMES,
    loss: LossContext = "kl",
    label_token: int | None = None,
    label_position: int | None = None,
    contrast_token: int | None = None,
    positions: Sequence[int] | None = None,
    top_k: int = 5,
    n_samples: int = 8,
    pgd_steps: int = 20,
    pgd_step_size: float = 0.1,
    seed: int = 0,
    controls: Sequence[Sequence[NodeKey]] = (),
    progress: Callable[[int, int], None] | None = None,
) -> InterventionResult:
    """Run ``nodes`` under each regime (and the same for each control node set); predictions,
    losses and label metrics."""
    T = len(ids)
    if loss == "label" and label_token is None:
        raise AnalysisError("loss='label' needs label_token")
    if label_token is not None and label_position is None:
        label_position = T - 1
    x = session.ids_tensor(ids)
    n_chunks = -(-len(controls) // CONTROL_BATCH)
    total = len(regimes) * (1 + n_chunks)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        nat = session.natural_ci(ids)
        target_lp = _log_probs(nat.logits)[None]  # (1, T, V)
        alive = {session.to_module[c]: (g > 0).float()[None] for c, g in nat.ci.items()}

        def loss_rows(lp: Tensor) -> Tensor:
            if loss == "kl":
                return (target_lp.exp() * (target_lp - lp)).sum(-1).mean(-1)
            assert label_token is not None and label_position is not None
            return -lp[:, label_position, label_token]

        res = _regimes(session, x, node_masks(session, nodes, T), alive, regimes, loss_rows,
                       n_samples, pgd_steps, pgd_step_size, tick)
        out_lp = {r: v[0][0] for r, v in res.items()}
        out_logits = {r: v[1][0] for r, v in res.items()}
        losses = {r: float(v[2][0]) for r, v in res.items()}
        ctrl_rows: dict[str, list[tuple[float, float]]] = {r: [] for r in regimes}
        for start in range(0, len(controls), CONTROL_BATCH):
            chunk = controls[start:start + CONTROL_BATCH]
            masks = [node_masks(session, c, T) for c in chunk]
            S = {m: torch.cat([mk[m] for mk in masks]) for m in masks[0]}
            cres = _regimes(session, x, S, alive, regimes, loss_rows, n_samples, pgd_steps,
                            pgd_step_size, tick)
            for r, (lp, _, ls) in cres.items():
                lab = (lp[:, label_position, label_token].tolist()
                       if label_token is not None else [float("nan")] * len(chunk))
                ctrl_rows[r] += list(zip(lab, ls.tolist(), strict=True))

    losses_target = 0.0 if loss == "kl" else float(-target_lp[0, label_position, label_token])
    losses = {"target": losses_target, **losses}
    label_prob = None
    metrics = None
    if label_token is not None and label_position is not None:
        label_prob = {"target": float(target_lp[0, label_position, label_token].exp())}
        label_prob |= {r: float(lp[label_position, label_token].exp())
                       for r, lp in out_lp.items()}
        metrics = {"target": _metrics(target_lp[0, label_position], nat.logits[label_position],
                                      label_token, contrast_token)}
        metrics |= {r: _metrics(lp[label_position], out_logits[r][label_position], label_token,
                                contrast_token) for r, lp in out_lp.items()}
    summary = None
    if controls:
        spread = None
        if label_token is not None:
            spread = {}
            for r, rows in ctrl_rows.items():
                lps = [a for a, _ in rows]
                probs = [math.exp(a) for a in lps]
                spread[r] = RegimeSpread(
                    prob_mean=round(sum(probs) / len(probs), 6), prob_min=round(min(probs), 6),
                    prob_max=round(max(probs), 6), logprob_mean=round(sum(lps) / len(lps), 5))
        summary = ControlSummary(
            n=len(controls), label=spread,
            loss_mean={r: round(sum(b for _, b in rows) / len(rows), 6)
                       for r, rows in ctrl_rows.items()},
            sets=[[str(n) for n in c] for c in controls[:3]])
    show = list(positions) if positions is not None else list(range(T))
    preds = []
    for p in show:
        row = PositionPredictions(
            pos=p,
            input_token=session.token_str(ids[p]),
            target=_topk(session, target_lp[0, p].exp(), top_k),
            regimes={r: _topk(session, lp[p].exp(), top_k) for r, lp in out_lp.items()},
        )
        if label_token is not None:
            row.label = {"target": float(target_lp[0, p, label_token].exp())}
            row.label |= {r: float(lp[p, label_token].exp()) for r, lp in out_lp.items()}
        preds.append(row)
    return InterventionResult(
        tokens=session.tokens(ids),
        n_nodes=len(nodes),
        loss_context=loss,
        label_token=session.token_str(label_token) if label_token is not None else None,
        label_position=label_position,
        contrast_token=session.token_str(contrast_token) if contrast_token is not None else None,
        loss={k: round(v, 6) for k, v in losses.items()},
        label_prob={k: round(v, 6) for k, v in label_prob.items()} if label_prob else None,
        label_metrics=metrics,
        controls=summary,
        predictions=preds,
    )
