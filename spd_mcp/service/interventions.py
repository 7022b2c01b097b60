"""Interventions on a prompt, stored get-or-create: a node set under the ci / stochastic /
adversarial / ablated regimes, ablations of whole components, and ablation sweeps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from spd_mcp.analysis.intervene import (
    REGIMES,
    InterventionResult,
    Regime,
    random_node_sets,
    run_intervention,
)
from spd_mcp.analysis.sweep import AblationSweep, ablation_sweep, random_component_sets
from spd_mcp.errors import InputError
from spd_mcp.keys import ComponentKey, NodeKey

from .model_info import validity_note
from .nodesets import alive_pairs, expand_components, expand_nodes
from .prompts import check_position, label_id, resolve_prompt
from .state import AppState, ProgressFn, compute
from .worker import remote


class StoredIntervention(InterventionResult):
    run_id: int
    cached: bool
    validity_note: str | None = Field(
        None, description="a caution when the decomposition fails its validity checks")
    expanded: dict[str, int] | None = Field(
        None, description="each pattern given (e.g. '1.attn.v:5:*') → how many keys it became")


async def _run(st: AppState, kind: str, ids: list[int], pid: int, nodes: list[NodeKey],
               params: dict[str, Any], progress: ProgressFn | None,
               expanded: dict[str, int] | None = None, notes: list[str] | None = None,
               **kw: Any) -> StoredIntervention:
    key = {"prompt_id": pid, "nodes": sorted(str(n) for n in nodes), **params}
    note = await validity_note(st, {n.layer for n in nodes})
    extra = {"validity_note": note, "expanded": expanded or None}
    found = await st.store.find_result(kind, key)
    if found is not None:
        return StoredIntervention(**found[1], run_id=found[0], cached=True, **extra)
    res = await compute(st, kind, remote(run_intervention, st.session, ids, nodes,
                                         progress=progress, **kw))
    res.notes += notes or []
    rid = await st.store.put_result(kind, key, res.model_dump(), None, pid)
    return StoredIntervention(**res.model_dump(), run_id=rid, cached=False, **extra)


async def intervention(
    st: AppState, *, nodes: Sequence[str], text: str | None, prompt_id: int | None,
    regimes: Sequence[Regime] = REGIMES, loss: Literal["kl", "label"] = "kl",
    label_token: str | None = None, label_position: int | None = None,
    positions: Sequence[int] | None = None, top_k: int = 5, n_samples: int = 8,
    pgd_steps: int = 20, pgd_step_size: float = 0.1, seed: int = 0,
    contrast_token: str | None = None, random_controls: int = 0,
    progress: ProgressFn | None = None,
) -> StoredIntervention:
    """``nodes`` under the chosen regimes, compared with the target (stored get-or-create)."""
    ids, pid = await resolve_prompt(st, text, prompt_id)
    T = len(ids)
    keys, expanded = await expand_nodes(st, nodes, ids)
    label = label_id(st, label_token)
    if loss == "label" and label is None:
        raise InputError("loss='label' needs label_token")
    contrast = _contrast(st, contrast_token, label)
    controls: list[list[NodeKey]] = []
    notes: list[str] = []
    if random_controls:
        if not keys:
            raise InputError("random_controls needs a non-empty nodes list")
        pairs = await compute(st, "alive set", remote(alive_pairs, st.session, ids))
        alive = [NodeKey(la, p, c) for la, pc in pairs.items() for p, c in pc]
        controls, full = random_node_sets(keys, alive, st.session.keys.Cs, random_controls,
                                          torch.Generator().manual_seed(seed))
        if not full:
            notes.append("too few alive nodes outside the set at some (layer, position): the "
                         "random controls are completed with dead components there")
    lpos = check_position(label_position, T, "label_position") if label is not None else None
    show = ([check_position(p, T, "positions[]") for p in positions] if positions is not None
            else [lpos if lpos is not None else T - 1])
    regs: list[Regime] = list(dict.fromkeys(regimes))
    params = {"regimes": regs, "loss": loss, "label": label, "label_position": lpos,
              "positions": show, "top_k": top_k, "n_samples": n_samples, "pgd_steps": pgd_steps,
              "pgd_step_size": pgd_step_size, "seed": seed, "contrast": contrast,
              "controls": random_controls}
    return await _run(st, "intervention", ids, pid, keys, params, progress, expanded, notes,
                      regimes=regs, loss=loss, label_token=label, label_position=lpos,
                      positions=show, top_k=top_k, n_samples=n_samples, pgd_steps=pgd_steps,
                      pgd_step_size=pgd_step_size, seed=seed, contrast_token=contrast,
                      controls=controls)


def _contrast(st: AppState, token: str | None, label: int | None) -> int | None:
    contrast = label_id(st, token)
    if contrast is not None and label is None:
        raise InputError("contrast_token needs label_token")
    if contrast is not None and contrast == label:
        raise InputError("contrast_token equals label_token; give a different token")
    return contrast


async def ablation(
    st: AppState, *, components: Sequence[str], text: str | None, prompt_id: int | None,
    label_token: str | None = None, positions: Sequence[int] | None = None, top_k: int = 5,
    contrast_token: str | None = None, random_controls: int = 0, seed: int = 0,
    progress: ProgressFn | None = None,
) -> StoredIntervention:
    """Components switched off at every position of the full model (stored get-or-create)."""
    ids, pid = await resolve_prompt(st, text, prompt_id)
    T = len(ids)
    comps, expanded = await expand_components(st, components, ids)
    if not comps:
        raise InputError("components matched nothing (a pattern with '@alive' found no alive "
                         "component); give at least one component")
    keys = [NodeKey(c.layer, p, c.c) for c in comps for p in range(T)]
    label = label_id(st, label_token)
    contrast = _contrast(st, contrast_token, label)
    show = ([check_position(p, T, "positions[]") for p in positions] if positions is not None
            else [T - 1])
    controls: list[list[NodeKey]] = []
    sets: list[list[ComponentKey]] = []
    notes: list[str] = []
    if random_controls:
        pairs = await compute(st, "alive set", remote(alive_pairs, st.session, ids))
        alive = [ComponentKey(la, c) for la, pc in pairs.items()
                 for c in sorted({c for _, c in pc})]
        gen = torch.Generator().manual_seed(seed)
        sets = random_component_sets(comps, alive, random_controls, gen)
        if any(len(x) < len(comps) for x in sets):
            notes.append("some layers have fewer alive components outside the set than the set "
                         "has there: control sets are smaller")
        controls = [[NodeKey(c.layer, p, c.c) for c in x for p in range(T)] for x in sets]
    params = {"components": sorted(map(str, comps)), "label": label, "positions": show,
              "top_k": top_k, "contrast": contrast, "controls": random_controls, "seed": seed}
    out = await _run(st, "ablation", ids, pid, keys, params, progress, expanded, notes,
                     regimes=["ablated"], loss="kl", label_token=label,
                     label_position=T - 1 if label is not None else None,
                     contrast_token=contrast, positions=show, top_k=top_k, controls=controls)
    if out.controls is not None:  # show the control sets as components, like the input
        out.controls.sets = [[str(c) for c in x] for x in sets[:3]]
    return out


class StoredSweep(AblationSweep):
    run_id: int
    cached: bool
    validity_note: str | None = Field(
        None, description="a caution when the decomposition fails its validity checks")
    expanded: dict[str, int] | None = Field(
        None, description="each pattern given (e.g. '1.attn.v:*') → how many keys it became")


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
    contrast = _contrast(st, contrast_token, label)
    lpos = check_position(label_position, T, "label_position")
    expanded: dict[str, int] = {}
    cands = None
    if candidates is not None:
        cands, expanded = await expand_components(st, candidates, ids)
        if not cands:
            raise InputError("candidates is empty (or its patterns matched nothing); omit it to "
                             "sweep every alive component")
    base_keys, more = await expand_components(st, base, ids)
    expanded |= more
    key = {"prompt_id": pid, "label": label, "contrast": contrast, "label_position": lpos,
           "candidates": sorted(map(str, cands)) if cands is not None else None,
           "base": sorted(map(str, base_keys)), "top": top, "greedy_steps": greedy_steps,
           "stop_prob": stop_prob, "random_controls": random_controls, "seed": seed}
    layers = {c.layer for c in (cands or [])} | {c.layer for c in base_keys}
    note = await validity_note(st, layers)
    extra = {"validity_note": note, "expanded": expanded or None}
    found = await st.store.find_result("ablation_sweep", key)
    if found is not None:
        return StoredSweep(**found[1], run_id=found[0], cached=True, **extra)
    res = await compute(st, "ablation_sweep", remote(
        ablation_sweep, s, ids, label, label_position=lpos, contrast=contrast,
        candidates=cands, base=base_keys, top=top, greedy_steps=greedy_steps,
        stop_prob=stop_prob, random_controls=random_controls, seed=seed, progress=progress))
    rid = await st.store.put_result("ablation_sweep", key, res.model_dump(), None, pid)
    return StoredSweep(**res.model_dump(), run_id=rid, cached=False, **extra)
