"""Sparse CI optimisation: the fewest components (at positions) that keep a prediction.

Optimises the pre-sigmoid CI of the components alive at the start (natural CI > 0) at positions up
to the target position, minimising ``loss + coeff · Σ (g_upper + ε)^p``. The loss at that position
is the cross-entropy of a label token (``ce``), the KL to the target's distribution (``kl``), the
negative label logit (``logit``) or, with a contrast token, ``softplus(-(logit(label) −
logit(contrast)))`` (``logit_diff``: keep the label ahead of the contrast). It is taken under CI
masks (g, no delta) and stochastic masks (g + (1 − g)·s, delta mask s) (``both``, the default),
and — with ``adv_coeff`` > 0 — under adversarial masks whose sources are a *persistent* PGD
adversary: one sign-gradient ascent step per optimisation step from the same backward pass, so
robustness costs one extra batch row, not a PGD loop per step.

Several prompts can be optimised together for one shared component set (``shared``): one gate
per component, applied at every position where it is alive, so the circuit is a set of
components that serves all the prompts.

Dead components stay at 0. The result reports the label probability under CI, stochastic and
adversarial (a fresh 20-step PGD) masks and in the target (CI-masked probability alone is
optimistic).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import Tensor

from spd_mcp.errors import AnalysisError
from spd_mcp.keys import ComponentKey, NodeKey
from spd_mcp.model.losses import pgd_sources
from spd_mcp.model.session import RunSession
from spd_mcp.model.sigmoids import lower_leaky_hard_sigmoid, upper_leaky_hard_sigmoid

OptLoss = Literal["ce", "kl", "logit", "logit_diff"]
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
    # A persistent adversary by default (benchmarks/optimize.py): circuits without it fell to
    # near zero under the adversarial regime on many tales probes.
    adv_coeff: float = Field(1.0, ge=0)
    adv_mode: Literal["persistent", "fresh"] = "persistent"
    pgd_steps: int = Field(10, ge=1, le=200, description="PGD steps per step (fresh mode)")
    pgd_step_size: float = Field(0.1, gt=0, le=1)
    seed: int = 0


class OptimizeMetrics(BaseModel):
    position: int
    label_token: str | None
    contrast_token: str | None = None
    n_alive_start: int = Field(description="alive (natural CI > 0) nodes at positions ≤ position")
    n_active: int = Field(description="nodes with optimised CI > 0")
    final_loss: float
    label_prob: dict[str, float] | None = Field(
        None, description="label-token probability: target, ci, stochastic, adversarial"
    )
    logit_diff: dict[str, float] | None = Field(
        None, description="logit(label) - logit(contrast) per regime (with a contrast token)")
    kl: dict[str, float] = Field(description="KL(target ‖ masked) at the position per regime")


@dataclass
class Task:
    """One prompt's prediction to keep."""

    ids: list[int]
    position: int
    label: int | None = None
    contrast: int | None = None


@dataclass
class OptimizedCI:
    cis: list[dict[str, Tensor]]
    """Per prompt: canonical layer → optimised CI (T, C), zero for dead components and later
    positions."""
    per_prompt: list[OptimizeMetrics]
    components: list[str]
    """Components with optimised CI > 0 anywhere (the shared set when optimised jointly)."""

    @property
    def ci(self) -> dict[str, Tensor]:
        return self.cis[0]

    @property
    def metrics(self) -> OptimizeMetrics:
        return self.per_prompt[0]


def circuit_nodes(opt: OptimizedCI, prompt: int = 0) -> list[NodeKey]:
    """The nodes with optimised CI > 0 on one prompt."""
    return [NodeKey(layer, int(p), int(c)) for layer, g in opt.cis[prompt].items()
            for p, c in torch.nonzero(g > 0).tolist()]


def _position_loss(kind: OptLoss, logits: Tensor, target_lp: Tensor, pos: Tensor,
                   label: Tensor, contrast: Tensor) -> Tensor:
    """Per-row loss (N,) at each row's position; rows are (prompt, sample) pairs and the index
    tensors (N,) give each row's position, label and contrast."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    at = logits[rows, pos].float()  # (N, V)
    if kind == "ce":
        return -F.log_softmax(at, -1)[rows, label]
    if kind == "logit":
        return -at[rows, label]
    if kind == "logit_diff":
        return F.softplus(-(at[rows, label] - at[rows, contrast]))
    tl = target_lp  # (N, V): each row's target log-probs at its position
    return (tl.exp() * (tl - F.log_softmax(at, -1))).sum(-1)


def _check(session: RunSession, tasks: Sequence[Task], s: OptimizeSettings) -> None:
    if not tasks:
        raise AnalysisError("no prompts to optimise")
    for i, t in enumerate(tasks):
        T = len(t.ids)
        if not 0 <= t.position < T:
            raise AnalysisError(f"prompts[{i}].position {t.position} out of range (prompt has "
                                f"{T} tokens: 0..{T - 1})")
        if s.loss in ("ce", "logit", "logit_diff") and t.label is None:
            raise AnalysisError(f"loss={s.loss!r} needs a label token; or use loss='kl'")
        if s.loss == "logit_diff" and t.contrast is None:
            raise AnalysisError("loss='logit_diff' needs a contrast token")


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """``module``'s parameters without gradients for the duration (restored after): the
    optimiser's ``backward`` would otherwise also compute (and keep) gradients for every
    component's V and U and through each forward's weight delta W − (V U)ᵀ — most of a step's
    work at seed size, for gradients nobody reads."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def optimize_ci(
    session: RunSession,
    ids: list[int] | None = None,
    *,
    position: int | None = None,
    label_token: int | None = None,
    contrast_token: int | None = None,
    tasks: Sequence[Task] | None = None,
    shared: bool | None = None,
    settings: OptimizeSettings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> OptimizedCI:
    """Optimise a sparse CI for the prediction at ``position`` (default: last) of ``ids``, or
    for several ``tasks`` at once (``shared`` component gates, the default for more than one)."""
    s = settings or OptimizeSettings()
    if tasks is None:
        assert ids is not None
        pos = len(ids) - 1 if position is None else position
        tasks = [Task(list(ids), pos, label_token, contrast_token)]
    if s.loss == "ce" and all(t.contrast is not None for t in tasks):
        s = s.model_copy(update={"loss": "logit_diff"})  # a contrast token asks for it
    _check(session, tasks, s)
    shared = len(tasks) > 1 if shared is None else shared
    cm = session.cm
    alpha = cm.leak_alpha
    P, T = len(tasks), max(len(t.ids) for t in tasks)
    dev = session.device
    x = torch.zeros(P, T, dtype=torch.long, device=dev)
    for i, t in enumerate(tasks):  # right padding: a causal model never reads it
        x[i, : len(t.ids)] = torch.tensor(t.ids, device=dev)
    pos = torch.tensor([t.position for t in tasks], device=dev)
    label = torch.tensor([t.label if t.label is not None else 0 for t in tasks], device=dev)
    contrast = torch.tensor([t.contrast if t.contrast is not None else 0 for t in tasks],
                            device=dev)
    n = s.n_mask_samples
    with torch.random.fork_rng(devices=[]), frozen(cm):
        torch.manual_seed(s.seed)
        with torch.no_grad():
            out, inputs = cm.forward_with_inputs(x)[:2]
            nat = cm.compute_ci(inputs)
            target_lp = F.log_softmax(out[torch.arange(P), pos].float(), dim=-1)  # (P, V)
        keep = (torch.arange(T, device=dev)[None, :] <= pos[:, None]).float()[..., None]
        alive = {m: (g > 0).float() * keep for m, g in nat.lower.items()}  # (P, T, C)
        if shared:
            z = {m: torch.where(a.amax((0, 1)) > 0, 1.0, 0.0).requires_grad_(True)
                 for m, a in alive.items()}  # (C,)
        else:
            z = {m: g.clamp(0, 1).clone().requires_grad_(True) for m, g in nat.lower.items()}
        opt = torch.optim.Adam(list(z.values()), lr=s.lr)

        def lower() -> dict[str, Tensor]:
            return {m: lower_leaky_hard_sigmoid(v, alpha).expand_as(alive[m]) * alive[m]
                    for m, v in z.items()}

        use_ci = s.mask_type in ("ci", "both")
        use_st = s.mask_type in ("stochastic", "both")
        persistent = s.adv_coeff > 0 and s.adv_mode == "persistent"
        src = {m: torch.rand_like(a).requires_grad_(True) for m, a in alive.items()}
        dsrc = {m: torch.rand(P, T, device=dev).requires_grad_(True) for m in alive}
        row_kinds = ((["ci"] if use_ci else []) + (["st"] * n if use_st else [])
                     + (["adv"] if persistent else []))
        R = len(row_kinds)
        xb = x.repeat(R, 1)  # (R·P, T): row block r holds every prompt
        idx = dict(pos=pos.repeat(R), label=label.repeat(R), contrast=contrast.repeat(R))
        tl_rows = target_lp.repeat(R, 1)
        weights = torch.tensor([1.0 if k == "ci" else (1.0 / n if k == "st" else s.adv_coeff)
                                for k in row_kinds], device=dev).repeat_interleave(P)

        def fresh_adversarial(ci: dict[str, Tensor]) -> Tensor:
            ci_det = {m: g.detach() for m, g in ci.items()}

            def fn(sr: dict[str, Tensor], dsr: dict[str, Tensor] | None) -> Tensor:
                masks = {m: g + (1 - g) * alive[m] * sr[m] for m, g in ci_det.items()}
                return _position_loss(s.loss, cm(x, masks=masks, delta_masks=dsr), target_lp,
                                      pos, label, contrast).sum()

            sr, dsr = pgd_sources(fn, ci_det, steps=s.pgd_steps, step_size=s.pgd_step_size,
                                  init="random", shared=False, include_delta=True)
            masks = {m: g + (1 - g) * alive[m] * sr[m] for m, g in ci.items()}
            return _position_loss(s.loss, cm(x, masks=masks, delta_masks=dsr), target_lp, pos,
                                  label, contrast).mean()

        final = 0.0
        for step in range(s.steps):
            ci = lower()
            masks: dict[str, list[Tensor]] = {m: [] for m in ci}
            dms: dict[str, list[Tensor]] = {m: [] for m in ci}
            for kind in row_kinds:
                for m, g in ci.items():
                    if kind == "ci":
                        masks[m].append(g)
                        dms[m].append(torch.zeros(P, T, device=dev))
                    elif kind == "st":
                        masks[m].append(g + (1 - g) * torch.rand_like(g))
                        dms[m].append(torch.rand(P, T, device=dev))
                    else:
                        masks[m].append(g + (1 - g) * alive[m] * src[m])
                        dms[m].append(dsrc[m])
            logits = cm(xb, masks={m: torch.cat(v) for m, v in masks.items()},
                        delta_masks={m: torch.cat(v) for m, v in dms.items()})
            per_row = _position_loss(s.loss, logits, tl_rows, idx["pos"], idx["label"],
                                     idx["contrast"])
            task = (per_row * weights).sum() / P
            if s.adv_coeff > 0 and not persistent:
                task = task + s.adv_coeff * fresh_adversarial(ci)
            upper = [upper_leaky_hard_sigmoid(v, alpha).expand_as(alive[m]) * alive[m]
                     for m, v in z.items()]
            imp = sum(((u + 1e-12) ** s.p * a).sum() for u, a in zip(upper, alive.values(),
                                                                    strict=True)) / P
            total = task + s.imp_coeff * imp
            opt.zero_grad(set_to_none=True)
            for v in (*src.values(), *dsrc.values()):
                v.grad = None
            total.backward()  # type: ignore[union-attr]
            opt.step()
            if persistent:  # the adversary ascends the same loss (sign step, clamped)
                with torch.no_grad():
                    for v in (*src.values(), *dsrc.values()):
                        if v.grad is not None:
                            v.add_(s.pgd_step_size * v.grad.sign()).clamp_(0.0, 1.0)
            final = float(task.detach())
            if progress is not None and (step % 10 == 0 or step == s.steps - 1):
                progress(step + 1, s.steps)

        with torch.no_grad():
            ci = lower()
            cis, metrics = [], []
            for i, t in enumerate(tasks):
                L = len(t.ids)
                ci_i = {m: g[i, :L] for m, g in ci.items()}
                alive_i = {m: a[i, :L] for m, a in alive.items()}
                metrics.append(_report(session, x[i : i + 1, :L], ci_i, alive_i,
                                       target_lp[i], t, s, final))
                cis.append(session.to_canonical_dict(ci_i))
    comps = sorted({str(ComponentKey(layer, int(c))) for d in cis for layer, g in d.items()
                    for c in torch.nonzero((g > 0).any(0)).flatten().tolist()})
    return OptimizedCI(cis=cis, per_prompt=metrics, components=comps)


@torch.no_grad()
def _report(session: RunSession, x: Tensor, ci: dict[str, Tensor], alive: dict[str, Tensor],
            target_lp: Tensor, task: Task, s: OptimizeSettings, final: float
            ) -> OptimizeMetrics:
    cm = session.cm
    T = x.shape[1]
    pos, label, contrast = task.position, task.label, task.contrast
    n = 16
    logits_by: dict[str, Tensor] = {}
    regimes: dict[str, Tensor] = {"target": target_lp}
    lg = cm(x, masks={m: g[None] for m, g in ci.items()})[0, pos].float()
    regimes["ci"], logits_by["ci"] = F.log_softmax(lg, -1), lg
    masks = {m: g + (1 - g) * torch.rand(n, T, g.shape[-1], device=x.device) for m, g in ci.items()}
    dm = {m: torch.rand(n, T, device=x.device) for m in ci}
    lg = cm(x.expand(n, T), masks=masks, delta_masks=dm)[:, pos].float()
    regimes["stochastic"] = F.log_softmax(lg, -1).exp().mean(0).log()
    logits_by["stochastic"] = lg.mean(0)
    ci_b = {m: g[None] for m, g in ci.items()}
    kind: OptLoss = "ce" if label is not None else "kl"
    t_pos = torch.tensor([pos], device=x.device)
    t_lab = torch.tensor([label or 0], device=x.device)
    t_con = torch.tensor([contrast or 0], device=x.device)

    def fn(src: dict[str, Tensor], dsrc: dict[str, Tensor] | None) -> Tensor:
        m_ = {m: g + (1 - g) * alive[m] * src[m] for m, g in ci_b.items()}
        logits = cm(x, masks=m_, delta_masks=dsrc)
        return _position_loss(kind, logits, target_lp[None], t_pos, t_lab, t_con).sum()

    with torch.enable_grad():
        src, dsrc = pgd_sources(fn, ci_b, steps=max(s.pgd_steps, 20), step_size=s.pgd_step_size,
                                init="random", shared=False, include_delta=True)
    adv_masks = {m: g + (1 - g) * alive[m] * src[m] for m, g in ci_b.items()}
    lg = cm(x, masks=adv_masks, delta_masks=dsrc)[0, pos].float()
    regimes["adversarial"], logits_by["adversarial"] = F.log_softmax(lg, -1), lg
    tl = target_lp
    kl = {k: round(float((tl.exp() * (tl - lp)).sum()), 6) for k, lp in regimes.items()}
    label_prob = diff = None
    if label is not None:
        label_prob = {k: round(float(lp[label].exp()), 6) for k, lp in regimes.items()}
    if label is not None and contrast is not None:
        target_logits = cm(x)[0, pos].float()
        diff = {"target": round(float(target_logits[label] - target_logits[contrast]), 4)}
        diff |= {k: round(float(v[label] - v[contrast]), 4) for k, v in logits_by.items()}
    return OptimizeMetrics(
        position=pos,
        label_token=session.token_str(label) if label is not None else None,
        contrast_token=session.token_str(contrast) if contrast is not None else None,
        n_alive_start=int(sum(a.sum() for a in alive.values())),
        n_active=int(sum((g > 0).sum() for g in ci.values())),
        final_loss=round(final, 6),
        label_prob=label_prob,
        logit_diff=diff,
        kl=kl,
    )
