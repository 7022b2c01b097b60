"""Ablation sweeps: switch candidate components off one at a time in the full model (batched),
rank them by their effect on a label, and grow a necessary set greedily.

Ablation here is the ``ablated`` regime applied to whole components: all masks 1 and the weight
delta on (the exact target), with the chosen components' masks 0 at every position. A necessary
set is grown by re-sweeping every remaining candidate on top of the set chosen so far and adding
the one that lowers the label most, until the label probability falls to ``stop_prob`` × the
target's or ``greedy_steps`` components have been added. Random controls are same-size sets of
alive components drawn per layer (as many from each layer as the set has).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import Tensor

from spd_mcp.errors import AnalysisError
from spd_mcp.keys import ComponentKey
from spd_mcp.model.session import RunSession

from .progress import Ticker

BATCH = 64
"""Ablated copies of the prompt per forward pass."""


class LabelMetrics(BaseModel):
    """How strongly the model predicts the label at the label position."""

    prob: float
    logprob: float = Field(description="log-probability of the label (nats)")
    logit: float
    logit_diff: float | None = Field(
        None, description="logit(label) - logit(contrast), when a contrast token is given")


class SweepEntry(BaseModel):
    component: str
    natural_ci_max: float = Field(description="the component's largest natural CI on the prompt")
    ci_at_label: float = Field(description="its natural CI at the label position")
    ablated: LabelMetrics = Field(description="label metrics with this component (and the base "
                                  "set) ablated everywhere")
    delta_logprob: float = Field(description="ablated - base log-probability of the label")


class GreedyStep(BaseModel):
    added: str
    ablated: LabelMetrics = Field(description="label metrics with the set so far ablated")


class ControlSpread(BaseModel):
    """Label metrics over random same-size sets of alive components (drawn per layer, never
    from the sweep's strongest candidates)."""

    n: int
    prob_mean: float
    prob_min: float
    prob_max: float
    logprob_mean: float
    sets: list[list[str]] = Field(description="the random sets drawn (first 5)")


class AblationSweep(BaseModel):
    tokens: list[str]
    label_token: str
    contrast_token: str | None
    label_position: int
    n_candidates: int
    target: LabelMetrics
    base: list[str] = Field(description="components ablated in every row of the sweep")
    base_ablated: LabelMetrics | None = Field(None, description="with only the base set ablated")
    ranked: list[SweepEntry] = Field(
        description="single-component effects on top of the base set, strongest first")
    greedy: list[GreedyStep] = Field(
        default_factory=list, description="the necessary set, grown one component per step")
    necessary_set: list[str] = Field(
        default_factory=list, description="components of the greedy set (empty without greedy)")
    reached: bool | None = Field(
        None, description="whether the greedy set brought P(label) to stop_prob × target or below")
    control: ControlSpread | None = None
    notes: list[str] = Field(default_factory=list)


def label_metrics(logits: Tensor, label: int, contrast: int | None) -> list[LabelMetrics]:
    """Per-row label metrics from (B, V) logits at the label position."""
    logits = logits.float()
    lab = F.log_softmax(logits, -1)[:, label].tolist()
    lg = logits[:, label].tolist()
    diff = ((logits[:, label] - logits[:, contrast]).tolist() if contrast is not None
            else [None] * len(lab))
    return [LabelMetrics(prob=round(math.exp(a), 6), logprob=round(a, 5),
                         logit=round(b, 5), logit_diff=None if d is None else round(d, 5))
            for a, b, d in zip(lab, lg, diff, strict=True)]


class _Ablator:
    """Batched forwards of one prompt with component sets switched off at every position."""

    def __init__(self, session: RunSession, ids: list[int], pos: int) -> None:
        self.s, self.pos = session, pos
        self.x = session.ids_tensor(ids)
        self.T = len(ids)

    @torch.no_grad()
    def run(self, sets: Sequence[Sequence[ComponentKey]],
            progress: Callable[[int], None] | None = None) -> Tensor:
        """Logits (len(sets), V) at the label position."""
        cm, s = self.s.cm, self.s
        lgs = []
        for start in range(0, len(sets), BATCH):
            chunk = sets[start:start + BATCH]
            B = len(chunk)
            masks = {m: torch.ones(B, self.T, C, device=s.device) for m, C in cm.Cs.items()}
            for b, comps in enumerate(chunk):
                for k in comps:
                    masks[s.to_module[k.layer]][b, :, k.c] = 0.0
            logits = cm(self.x.expand(B, self.T), masks=masks,
                        delta_masks={m: 1.0 for m in masks})[:, self.pos].float()
            lgs.append(logits)
            if progress is not None:
                progress(B)
        return torch.cat(lgs)


def alive_components(session: RunSession, ci: dict[str, Tensor]) -> dict[ComponentKey, float]:
    """Components with natural CI > 0 at some position → their largest CI, by layer order."""
    out: dict[ComponentKey, float] = {}
    for layer, g in ci.items():
        peak = g.max(0).values  # (C,)
        for c in torch.nonzero(peak > 0).flatten().tolist():
            out[ComponentKey(layer, c)] = float(peak[c])
    return out


def random_component_sets(chosen: Sequence[ComponentKey], alive: Sequence[ComponentKey], k: int,
                 gen: torch.Generator) -> list[list[ComponentKey]]:
    """``k`` random sets, as many per layer as ``chosen`` has, from alive components not in it."""
    by_layer: dict[str, list[ComponentKey]] = {}
    for a in alive:
        if a not in chosen:
            by_layer.setdefault(a.layer, []).append(a)
    want: dict[str, int] = {}
    for c in chosen:
        want[c.layer] = want.get(c.layer, 0) + 1
    sets = []
    for _ in range(k):
        drawn: list[ComponentKey] = []
        for layer, n in want.items():
            pool = by_layer.get(layer, [])
            idx = torch.randperm(len(pool), generator=gen)[:n].tolist()
            drawn += [pool[i] for i in idx]
        sets.append(drawn)
    return sets


@torch.no_grad()
def ablation_sweep(
    session: RunSession,
    ids: list[int],
    label: int,
    *,
    label_position: int | None = None,
    contrast: int | None = None,
    candidates: Sequence[ComponentKey] | None = None,
    base: Sequence[ComponentKey] = (),
    top: int = 20,
    greedy_steps: int = 0,
    stop_prob: float = 0.01,
    random_controls: int = 0,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> AblationSweep:
    """Rank ``candidates`` (default: every component alive on the prompt) by the label effect of
    ablating each everywhere on top of ``base``; optionally grow a greedy necessary set."""
    T = len(ids)
    pos = T - 1 if label_position is None else label_position
    nat = session.natural_ci(ids)
    alive = alive_components(session, nat.ci)
    cands = list(dict.fromkeys(candidates)) if candidates is not None else list(alive)
    base = list(dict.fromkeys(base))
    cands = [c for c in cands if c not in base]
    if not cands:
        raise AnalysisError("no candidate components to sweep (all are in the base set, or none "
                            "is alive on this prompt)")
    ab = _Ablator(session, ids, pos)
    n_rows = len(cands) + 1 + sum(len(cands) - i for i in range(greedy_steps)) + random_controls
    tick = Ticker(n_rows, progress)

    target = label_metrics(nat.logits[pos][None], label, contrast)[0]
    rows = label_metrics(ab.run([base, *[[*base, c] for c in cands]], tick), label, contrast)
    base_m, single = rows[0], rows[1:]
    order = sorted(range(len(cands)), key=lambda i: single[i].logprob)
    at_label = {layer: g[pos] for layer, g in nat.ci.items()}
    ranked = [SweepEntry(component=str(cands[i]), natural_ci_max=round(alive.get(cands[i], 0.0), 5),
                         ci_at_label=round(float(at_label[cands[i].layer][cands[i].c]), 5),
                         ablated=single[i],
                         delta_logprob=round(single[i].logprob - base_m.logprob, 5))
              for i in order[:top]]
    notes: list[str] = []
    if candidates is not None and (dead := [str(c) for c in cands if c not in alive]):
        notes.append(f"{len(dead)} candidates are not alive on this prompt (natural CI 0 "
                     f"everywhere), e.g. {', '.join(dead[:5])}")

    greedy: list[GreedyStep] = []
    chosen = list(base)
    reached: bool | None = None
    if greedy_steps:
        goal = stop_prob * target.prob
        remaining = list(cands)
        best_i = order[0]
        best = single[best_i]
        for step in range(greedy_steps):
            if step > 0:
                rows = label_metrics(ab.run([[*chosen, c] for c in remaining], tick), label,
                                     contrast)
                best_i = min(range(len(remaining)), key=lambda i: rows[i].logprob)
                best = rows[best_i]
            comp = remaining.pop(best_i)
            chosen.append(comp)
            greedy.append(GreedyStep(added=str(comp), ablated=best))
            if best.prob <= goal or not remaining:
                break
        reached = greedy[-1].ablated.prob <= goal
        if not reached:
            notes.append(f"the greedy set of {len(greedy)} components leaves P(label) at "
                         f"{greedy[-1].ablated.prob:.3g} (goal {goal:.3g}); raise greedy_steps "
                         "or the behaviour has routes the candidates do not cover")

    control = None
    claim = chosen[len(base):] if greedy else []
    if random_controls:
        if not claim:
            notes.append("random_controls need a greedy set (greedy_steps > 0); none drawn")
        else:
            gen = torch.Generator().manual_seed(seed)
            strong = {cands[i] for i in order[:max(top, 2 * len(claim))]}
            pool = [a for a in alive if a not in strong]  # controls never draw strong candidates
            sets = random_component_sets(claim, pool, random_controls, gen)
            rows = label_metrics(ab.run([[*base, *s] for s in sets], tick), label, contrast)
            probs = [r.prob for r in rows]
            control = ControlSpread(
                n=len(sets), prob_mean=round(sum(probs) / len(probs), 6),
                prob_min=min(probs), prob_max=max(probs),
                logprob_mean=round(sum(r.logprob for r in rows) / len(rows), 5),
                sets=[[str(c) for c in s] for s in sets[:5]])
    tick.finish()
    return AblationSweep(
        tokens=session.tokens(ids), label_token=session.token_str(label),
        contrast_token=session.token_str(contrast) if contrast is not None else None,
        label_position=pos, n_candidates=len(cands), target=target,
        base=[str(c) for c in base], base_ablated=base_m if base else None, ranked=ranked,
        greedy=greedy, necessary_set=[str(c) for c in claim], reached=reached, control=control,
        notes=notes)
