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


def _loss(
    kind: LossContext, target_lp: Tensor, lp: Tensor, label: int | None, pos: int | None
) -> Tensor:
    """Scalar loss of regime log-probs ``lp`` (B, T, V) against the target's (1, T, V)."""
    if kind == "kl":
        kl = (target_lp.exp() * (target_lp - lp)).sum(-1)  # (B, T)
        return kl.mean()
    assert label is not None and pos is not None
    return -lp[:, pos, label].mean()


def _topk(session: RunSession, probs: Tensor, k: int) -> list[TokenProb]:
    p, i = probs.topk(k)
    return [
        TokenProb(token=session.token_str(t), token_id=t, prob=round(v, 6))
        for v, t in zip(p.tolist(), i.tolist(), strict=True)
    ]


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
    positions: Sequence[int] | None = None,
    top_k: int = 5,
    n_samples: int = 8,
    pgd_steps: int = 20,
    pgd_step_size: float = 0.1,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> InterventionResult:
    """Run ``nodes`` under each regime; predictions, losses and label probabilities."""
    cm = session.cm
    T = len(ids)
    if loss == "label" and label_token is None:
        raise AnalysisError("loss='label' needs label_token")
    if label_token is not None and label_position is None:
        label_position = T - 1
    x = session.ids_tensor(ids)
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        nat = session.natural_ci(ids)
        target_lp = _log_probs(nat.logits)[None]  # (1, T, V)
        S = node_masks(session, nodes, T)
        alive = {session.to_module[c]: (g > 0).float()[None] for c, g in nat.ci.items()}
        out_lp: dict[str, Tensor] = {}
        losses: dict[str, float] = {}

        def loss_of(lp: Tensor) -> Tensor:
            return _loss(loss, target_lp, lp, label_token, label_position)

        for done, regime in enumerate(regimes, start=1):
            if regime == "ci":
                lp = _log_probs(cm(x, masks=S))
            elif regime == "ablated":
                masks = {m: 1.0 - s for m, s in S.items()}
                lp = _log_probs(cm(x, masks=masks, delta_masks={m: 1.0 for m in S}))
            elif regime == "stochastic":
                xs = x.expand(n_samples, T)
                masks = {m: s + (1 - s) * torch.rand(n_samples, T, s.shape[-1], device=x.device)
                         for m, s in S.items()}
                dm = {m: torch.rand(n_samples, T, device=x.device) for m in S}
                lp = _log_probs(cm(xs, masks=masks, delta_masks=dm))  # (n, T, V)
            elif regime == "adversarial":

                def adv_loss(src: dict[str, Tensor], dsrc: dict[str, Tensor] | None) -> Tensor:
                    masks = {m: S[m] + (1 - S[m]) * alive[m] * src[m] for m in S}
                    assert dsrc is not None
                    return loss_of(_log_probs(cm(x, masks=masks, delta_masks=dsrc)))

                with torch.enable_grad():
                    src, dsrc = pgd_sources(
                        adv_loss, S, steps=pgd_steps, step_size=pgd_step_size, init="random",
                        shared=False, include_delta=True,
                    )
                masks = {m: S[m] + (1 - S[m]) * alive[m] * src[m] for m in S}
                lp = _log_probs(cm(x, masks=masks, delta_masks=dsrc))
            else:
                raise AnalysisError(f"unknown regime {regime!r}; valid: {', '.join(REGIMES)}")
            losses[regime] = float(loss_of(lp))
            # Average probabilities over samples (stochastic), then back to log space.
            out_lp[regime] = lp.exp().mean(0).log()
            if progress is not None:
                progress(done, len(regimes))

    losses_target = 0.0 if loss == "kl" else float(loss_of(target_lp))
    losses = {"target": losses_target, **losses}
    label_prob = None
    if label_token is not None and label_position is not None:
        label_prob = {"target": float(target_lp[0, label_position, label_token].exp())}
        label_prob |= {r: float(lp[label_position, label_token].exp()) for r, lp in out_lp.items()}
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
        loss={k: round(v, 6) for k, v in losses.items()},
        label_prob={k: round(v, 6) for k, v in label_prob.items()} if label_prob else None,
        predictions=preds,
    )
