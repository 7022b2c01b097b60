"""Sparse CI optimisation: the fewest components (at positions) that keep a prediction.

Optimises the pre-sigmoid CI of the components alive at the start (natural CI > 0) at positions up
to the target position, minimising ``loss + coeff · Σ (g_upper + ε)^p``. The loss is the
cross-entropy of a label token (``ce``), the KL to the target's distribution (``kl``) or the
negative label logit (``logit``) at that position, under CI masks (g, no delta), stochastic masks
(g + (1 − g)·s, delta mask s), or both summed (the default); an optional adversarial term
adds the loss under PGD-chosen sources.
Dead components stay at 0. The result reports the label probability under CI, stochastic and
adversarial masks and in the target (CI-masked probability alone is optimistic).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import Tensor

from spd_mcp.errors import AnalysisError
from spd_mcp.model.losses import pgd_sources
from spd_mcp.model.session import RunSession
from spd_mcp.model.sigmoids import lower_leaky_hard_sigmoid, upper_leaky_hard_sigmoid

OptLoss = Literal["ce", "kl", "logit"]
MaskType = Literal["ci", "stochastic", "both"]


class OptimizeSettings(BaseModel):
    loss: OptLoss = "ce"
    steps: int = Field(200, ge=1, le=5000)
    lr: float = Field(0.1, gt=0, le=10)
    # Stochastic masks by default: under CI masks (everything else off, no delta) the optimiser
    # finds last-position shortcuts that write the answer without the real mechanism (measured on
    # tales pronoun probes: ablating such a circuit in the target barely moves the prediction).
    # "both" adds the CI-masked loss so the circuit also works on its own (CI regime).
    imp_coeff: float = Field(0.003, ge=0)
    p: float = Field(0.5, gt=0, le=2)
    mask_type: MaskType = "both"
    n_mask_samples: int = Field(4, ge=1, le=64)
    adv_coeff: float = Field(0.0, ge=0)
    pgd_steps: int = Field(10, ge=1, le=200)
    pgd_step_size: float = Field(0.1, gt=0, le=1)
    seed: int = 0


class OptimizeMetrics(BaseModel):
    position: int
    label_token: str | None
    n_alive_start: int = Field(description="alive (natural CI > 0) nodes at positions ≤ position")
    n_active: int = Field(description="nodes with optimised CI > 0")
    final_loss: float
    label_prob: dict[str, float] | None = Field(
        None, description="label-token probability: target, ci, stochastic, adversarial"
    )
    kl: dict[str, float] = Field(description="KL(target ‖ masked) at the position per regime")


@dataclass
class OptimizedCI:
    ci: dict[str, Tensor]
    """Canonical layer → optimised CI (T, C), zero for dead components and later positions."""
    metrics: OptimizeMetrics


def _position_loss(
    kind: OptLoss, logits: Tensor, target_lp: Tensor, pos: int, label: int | None
) -> Tensor:
    lp = F.log_softmax(logits[:, pos].float(), dim=-1)  # (B, V)
    if kind == "ce":
        assert label is not None
        return -lp[:, label].mean()
    if kind == "logit":
        assert label is not None
        return -logits[:, pos, label].float().mean()
    tl = target_lp[pos]  # (V,)
    return (tl.exp() * (tl - lp)).sum(-1).mean()


def optimize_ci(
    session: RunSession,
    ids: list[int],
    *,
    position: int | None = None,
    label_token: int | None = None,
    settings: OptimizeSettings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> OptimizedCI:
    """Optimise a sparse CI for the prediction at ``position`` (default: last)."""
    s = settings or OptimizeSettings()
    cm = session.cm
    T = len(ids)
    pos = T - 1 if position is None else position
    if not 0 <= pos < T:
        raise AnalysisError(f"position {pos} out of range (prompt has {T} tokens: 0..{T - 1})")
    if s.loss in ("ce", "logit") and label_token is None:
        raise AnalysisError(f"loss={s.loss!r} needs a label token; or use loss='kl'")
    alpha = cm.leak_alpha
    x = session.ids_tensor(ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        with torch.no_grad():
            out, inputs = cm.forward_with_inputs(x)[:2]
            nat = cm.compute_ci(inputs)
            target_lp = F.log_softmax(out[0].float(), dim=-1)  # (T, V)
        keep = torch.zeros(T, 1, device=x.device)
        keep[: pos + 1] = 1.0
        alive = {m: ((g[0] > 0).float() * keep) for m, g in nat.lower.items()}  # (T, C)
        z = {m: g[0].clamp(0, 1).clone().requires_grad_(True) for m, g in nat.lower.items()}
        opt = torch.optim.Adam(list(z.values()), lr=s.lr)

        def lower() -> dict[str, Tensor]:
            return {m: lower_leaky_hard_sigmoid(v, alpha) * alive[m] for m, v in z.items()}

        def loss_under(ci: dict[str, Tensor], mask_type: MaskType, n: int) -> Tensor:
            if mask_type == "both":
                return loss_under(ci, "ci", n) + loss_under(ci, "stochastic", n)
            if mask_type == "ci":
                logits = cm(x, masks={m: g[None] for m, g in ci.items()})
            else:
                xs = x.expand(n, T)
                masks = {m: g + (1 - g) * torch.rand(n, *g.shape, device=x.device)
                         for m, g in ci.items()}
                dm = {m: torch.rand(n, T, device=x.device) for m in ci}
                logits = cm(xs, masks=masks, delta_masks=dm)
            return _position_loss(s.loss, logits, target_lp, pos, label_token)

        def adversarial_loss(ci: dict[str, Tensor]) -> Tensor:
            ci_det = {m: g.detach()[None] for m, g in ci.items()}

            def fn(src: dict[str, Tensor], dsrc: dict[str, Tensor] | None) -> Tensor:
                masks = {m: g + (1 - g) * alive[m] * src[m] for m, g in ci_det.items()}
                return _position_loss(s.loss, cm(x, masks=masks, delta_masks=dsrc), target_lp,
                                      pos, label_token)

            src, dsrc = pgd_sources(fn, ci_det, steps=s.pgd_steps, step_size=s.pgd_step_size,
                                    init="random", shared=False, include_delta=True)
            masks = {m: g[None] + (1 - g[None]) * alive[m] * src[m] for m, g in ci.items()}
            return _position_loss(s.loss, cm(x, masks=masks, delta_masks=dsrc), target_lp, pos,
                                  label_token)

        final = 0.0
        for step in range(s.steps):
            ci = lower()
            task = loss_under(ci, s.mask_type, s.n_mask_samples)
            if s.adv_coeff > 0:
                task = task + s.adv_coeff * adversarial_loss(ci)
            upper = [upper_leaky_hard_sigmoid(v, alpha) * alive[m] for m, v in z.items()]
            imp = sum(((u + 1e-12) ** s.p * alive_m).sum()
                      for u, alive_m in zip(upper, alive.values(), strict=True))
            total = task + s.imp_coeff * imp
            opt.zero_grad(set_to_none=True)
            total.backward()  # type: ignore[union-attr]
            opt.step()
            final = float(task.detach())
            if progress is not None and (step % 10 == 0 or step == s.steps - 1):
                progress(step + 1, s.steps)

        with torch.no_grad():
            ci = lower()
            metrics = _report(session, x, ci, alive, target_lp, pos, label_token, s, final)
    return OptimizedCI(ci=session.to_canonical_dict(ci), metrics=metrics)


@torch.no_grad()
def _report(
    session: RunSession,
    x: Tensor,
    ci: dict[str, Tensor],
    alive: dict[str, Tensor],
    target_lp: Tensor,
    pos: int,
    label: int | None,
    s: OptimizeSettings,
    final: float,
) -> OptimizeMetrics:
    cm = session.cm
    T = x.shape[1]
    n = 16
    regimes: dict[str, Tensor] = {"target": target_lp[pos]}
    regimes["ci"] = F.log_softmax(cm(x, masks={m: g[None] for m, g in ci.items()})[0, pos], -1)
    masks = {m: g + (1 - g) * torch.rand(n, T, g.shape[-1], device=x.device) for m, g in ci.items()}
    dm = {m: torch.rand(n, T, device=x.device) for m in ci}
    st = F.log_softmax(cm(x.expand(n, T), masks=masks, delta_masks=dm)[:, pos].float(), -1)
    regimes["stochastic"] = st.exp().mean(0).log()
    ci_b = {m: g[None] for m, g in ci.items()}

    def fn(src: dict[str, Tensor], dsrc: dict[str, Tensor] | None) -> Tensor:
        m_ = {m: g + (1 - g) * alive[m] * src[m] for m, g in ci_b.items()}
        logits = cm(x, masks=m_, delta_masks=dsrc)
        return _position_loss("ce" if label is not None else "kl", logits, target_lp, pos, label)

    with torch.enable_grad():
        src, dsrc = pgd_sources(fn, ci_b, steps=max(s.pgd_steps, 20), step_size=s.pgd_step_size,
                                init="random", shared=False, include_delta=True)
    adv_masks = {m: g + (1 - g) * alive[m] * src[m] for m, g in ci_b.items()}
    regimes["adversarial"] = F.log_softmax(
        cm(x, masks=adv_masks, delta_masks=dsrc)[0, pos].float(), -1
    )
    tl = target_lp[pos]
    kl = {k: round(float((tl.exp() * (tl - lp)).sum()), 6) for k, lp in regimes.items()}
    label_prob = None
    if label is not None:
        label_prob = {k: round(float(lp[label].exp()), 6) for k, lp in regimes.items()}
    return OptimizeMetrics(
        position=pos,
        label_token=session.token_str(label) if label is not None else None,
        n_alive_start=int(sum(a.sum() for a in alive.values())),
        n_active=int(sum((g > 0).sum() for g in ci.values())),
        final_loss=round(final, 6),
        label_prob=label_prob,
        kl=kl,
    )
