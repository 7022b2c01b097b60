"""Interventions on a prompt, stored get-or-create: a node set under the ci / stochastic /
adversarial / ablated regimes, ablations of whole components, and ablation sweeps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from spd_mcp.analysis.intervene import REGIMES, InterventionResult, Regime, run_intervention
from spd_mcp.analysis.sweep import AblationSweep, ablation_sweep
from spd_mcp.errors import InputError
from spd_mcp.keys import NodeKey

from .model_info import validity_note
from .prompts import check_position, label_id, resolve_prompt
from .state import AppState, ProgressFn, compute


class StoredIntervention(InterventionResult):
    run_id: int
    cached: bool
    validity_note: str | None = Field(
        None, description="a caution when the decomposition fails its validity checks")


async def _run(st: AppState, kind: str, ids: list[int], pid: int, nodes: list[NodeKey],
               params: dict[str, Any], progress: ProgressFn | None, **kw: Any
               ) -> StoredIntervention:
    key = {"prompt_id": pid, "nodes": sorted(str(n) for n in nodes), **params}
    note = await validity_note(st, {n.layer for n in nodes})
    found = await st.store.find_result(kind, key)
    if found is not None:
        return StoredIntervention(**found[1], run_id=found[0], cached=True, validity_note=note)
    res = await compute(st, kind, lambda: run_intervention(
        st.session, ids, nodes, progress=progress, **kw))
    rid = await st.store.put_result(kind, key, res.model_dump(), None, pid)
    return StoredIntervention(**res.model_dump(), run_id=rid, cached=False, validity_note=note)


async def intervention(
    st: AppState, *, nodes: Sequence[str], text: str | None, prompt_id: int | None,
    regimes: Sequence[Regime] = REGIMES, loss: Literal["kl", "label"] = "kl",
    label_token: str | None = None, label_position: int | None = None,
    positions: Sequence[int] | None = None, top_k: int = 5, n_samples: int = 8,
    pgd_steps: int = 20, pgd_step_size: float = 0.1, seed: int = 0,
    progress: ProgressFn | None = None,
) -> StoredIntervention:
    """``nodes`` under the chosen regimes, compared with the target (stored get-or-create)."""
    s = st.session
    ids, pid = await resolve_prompt(st, text, prompt_id)
    T = len(ids)
    keys = s.keys.nodes(list(nodes), T, allow_special=False)
    label = label_id(st, label_token)
    if loss == "label" and label is None:
        raise InputError("loss='label' needs label_token")
    lpos = check_position(label_position, T, "label_position") if label is not None else None
    show = ([check_position(p, T, "positions[]") for p in positions] if positions is not None
            else [lpos if lpos is not None else T - 1])
    regs: list[Regime] = list(dict.fromkeys(regimes))
    params = {"regimes": regs, "loss": loss, "label": label, "label_position": lpos,
              "positions": show, "top_k": top_k, "n_samples": n_samples, "pgd_steps": pgd_steps,
              "pgd_step_size": pgd_step_size, "seed": seed}
    return await _run(st, "intervention", ids, pid, keys, params, progress, regimes=regs,
                      loss=loss, label_token=label, label_position=lpos, positions=show,
                      top_k=top_k, n_samples=n_samples, pgd_steps=pgd_steps,
                      pgd_step_size=pgd_step_size, seed=seed)


async def ablation(
    st: AppState, *, components: Sequence[str], text: str | None, prompt_id: int | None,
    label_token: str | None = None, positions: Sequence[int] | None = None, top_k: int = 5,
    progress: ProgressFn | None = None,
) -> StoredIntervention:
    """Components switched off at every position of the full model (stored get-or-create)."""
    s = st.session
    ids, pid = await resolve_prompt(st, text, prompt_id)
    T = len(ids)
    comps = s.keys.components(list(components))
    keys = [NodeKey(c.layer, p, c.c) for c in comps for p in range(T)]
    label = label_id(st, label_token)
    show = ([check_position(p, T, "positions[]") for p in positions] if positions is not None
            else [T - 1])
    params = {"components": sorted(components), "label": label, "positions": show, "top_k": top_k}
    return await _run(st, "ablation", ids, pid, keys, params, progress, regimes=["ablated"],
                      loss="kl", label_token=label,
                      label_position=T - 1 if label is not None else None,
                      positions=show, top_k=top_k)


class StoredSweep(AblationSweep):
    run_id: int
    cached: bool
    validity_note: str | None = Field(
        None, description="a caution when the decomposition fails its validity checks")


async def sweep(
    st: AppState, *, text: str | None, prompt_id: int | None, label_token: str,
    contrast_token: str | None = None, label_position: int | None = None,
    candidates: Sequence[str] | None = None, base: Sequence[str] = (), top: int = 20,
    greedy_steps: int = 0, stop_prob: float = 0.01, random_controls: int = 0, seed: int = 0,
    progress: ProgressFn | None = None,
) -> StoredSweep:
    """One-at-a-time ablation sweep with an optional greedy necessary set (stored
    get-or-create)."""
    s = st.session
    ids, pid = await resolve_prompt(st, text, prompt_id)
    T = len(ids)
    label = s.token_id(label_token)
    contrast = label_id(st, contrast_token)
    if contrast is not None and contrast == label:
        raise InputError("contrast_token equals label_token; give a different token")
    lpos = check_position(label_position, T, "label_position")
    cands = s.keys.components(list(candidates)) if candidates is not None else None
    if cands is not None and not cands:
        raise InputError("candidates is empty; omit it to sweep every alive component")
    base_keys = s.keys.components(list(base))
    key = {"prompt_id": pid, "label": label, "contrast": contrast, "label_position": lpos,
           "candidates": sorted(candidates) if candidates is not None else None,
           "base": sorted(base), "top": top, "greedy_steps": greedy_steps,
           "stop_prob": stop_prob, "random_controls": random_controls, "seed": seed}
    layers = {c.layer for c in (cands or [])} | {c.layer for c in base_keys}
    note = await validity_note(st, layers)
    found = await st.store.find_result("ablation_sweep", key)
    if found is not None:
        return StoredSweep(**found[1], run_id=found[0], cached=True, validity_note=note)
    res = await compute(st, "ablation_sweep", lambda: ablation_sweep(
        s, ids, label, label_position=lpos, contrast=contrast, candidates=cands,
        base=base_keys, top=top, greedy_steps=greedy_steps, stop_prob=stop_prob,
        random_controls=random_controls, seed=seed, progress=progress))
    rid = await st.store.put_result("ablation_sweep", key, res.model_dump(), None, pid)
    return StoredSweep(**res.model_dump(), run_id=rid, cached=False, validity_note=note)
