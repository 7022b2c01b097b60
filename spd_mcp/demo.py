"""``spd-mcp demo``: a built-in, LLM-free scripted investigator driving the MCP server over stdio.

It answers a planted-behaviour question on ``tales`` the way an agent would (circuit, interventions
under four regimes, a random control, a greedy necessity sweep, component knowledge, an
output-token search and the explanation's ablation),
writes the research log, a graph artifact, an explanation and a summary into a task directory, and
prints a report.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spd_mcp.errors import OperationError
from spd_mcp.keys import ComponentKey, NodeKey

if TYPE_CHECKING:  # the CLI imports this module to build its parser: keep that light
    from mcp import ClientSession
    from rich.console import Console

QUESTION = ("How does the model know which pronoun (he/she) to use after a connective "
            "(', and then', ', so', 'because')?")
REGIMES = ("ci", "stochastic", "adversarial", "ablated")
N_TOP = 3
GREEDY_STEPS = 32
STOP_PROB = 1e-4
N_CONTROLS = 10


class DemoError(OperationError):
    """A tool call failed."""


@dataclass
class Findings:
    """What the scripted investigation found (for the final report)."""

    prompt: str = ""
    label: str = ""
    circuit: list[str] = field(default_factory=list)
    n_alive: int = 0
    graph_probs: dict[str, float] = field(default_factory=dict)
    regime_probs: dict[str, float] = field(default_factory=dict)
    control: list[str] = field(default_factory=list)
    control_probs: dict[str, float] = field(default_factory=dict)
    component_probs: dict[str, float] = field(default_factory=dict)
    """P(label) with the circuit's components ablated everywhere."""
    necessary: list[str] = field(default_factory=list)
    """The greedy necessary set from sweep_ablation."""
    necessary_probs: dict[str, float] = field(default_factory=dict)
    """target / greedy set ablated / random same-size sets (mean) P(label)."""
    explanation: list[str] = field(default_factory=list)
    explanation_probs: dict[str, float] = field(default_factory=dict)
    """P(label) with the explanation's components ablated everywhere (what a grader checks)."""
    top: list[dict[str, Any]] = field(default_factory=list)
    searched: list[str] = field(default_factory=list)
    search_probs: dict[str, float] = field(default_factory=dict)
    artifact_id: str = ""
    contrast: str = ""
    contrastive: list[str] = field(default_factory=list)
    """The contrastive (label − contrast) circuit's nodes."""
    contrastive_claim: str = ""
    contrastive_diff: dict[str, float] = field(default_factory=dict)
    corrupt: str = ""
    """The minimal pair: the probe with the referent's name swapped to the other gender."""
    name_positions: list[int] = field(default_factory=list)
    patch_fraction: float | None = None
    """Fraction of the logit difference moved by patching every layer at the name positions."""
    patch_top: list[dict[str, Any]] = field(default_factory=list)


class Investigator:
    """Calls tools through one MCP client session and prints a line per step."""

    def __init__(self, session: ClientSession, console: Console) -> None:
        self.session = session
        self.console = console
        self.t0 = time.perf_counter()

    def say(self, msg: str) -> None:
        self.console.print(f"[dim]{time.perf_counter() - self.t0:6.1f}s[/dim] {msg}",
                           highlight=False, soft_wrap=True)

    async def call(self, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        res = await self.session.call_tool(tool, args)
        if res.is_error:
            text = " ".join(getattr(c, "text", "") for c in res.content)
            raise DemoError(f"{tool} failed: {text}")
        return dict(res.structured_content or {})

    async def log(self, title: str, entry: str) -> None:
        await self.call("update_research_log", {"entry": entry, "title": title})


def _fmt_probs(probs: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in probs.items())


def _component(node: str) -> str:
    return str(NodeKey.parse(node).component)


def _pick_probe() -> tuple[str, str]:
    from spd_mcp.model.zoo.tales.corpus import BEHAVIOURS

    probe = BEHAVIOURS["pronoun"].probes(seed=7, n=1)[0]
    return probe.prompt, probe.expected


def _node(component: str, pos: int) -> str:
    key = ComponentKey.parse(component)
    return str(NodeKey(key.layer, pos, key.c))


def _pos(node: str) -> int:
    return NodeKey.parse(node).pos


async def _natural_ci(inv: Investigator, text: str, nodes: list[str]
                      ) -> dict[str, tuple[float, float]]:
    """Natural (CI, |activation|) of every alive node at the positions of ``nodes``."""
    positions = sorted({_pos(n) for n in nodes})
    ci = await inv.call("get_ci", {"text": text, "positions": positions, "top_per_position": 100})
    return {_node(t["key"], row["pos"]): (float(t["ci"]), abs(float(t["act"])))
            for row in ci["positions"] for t in row["top"]}


def _random_control(circuit: list[str], alive: list[str], Cs: dict[str, int],
                    rng: random.Random) -> list[str]:
    """Random alive nodes at the circuit's positions, as many per position as the circuit."""
    out: list[str] = []
    for pos, want in sorted(Counter(_pos(n) for n in circuit).items()):
        pool = sorted(n for n in alive if _pos(n) == pos and n not in circuit)
        while len(pool) < want:  # too few alive: random component indices at this position
            layer = rng.choice(sorted(Cs))
            pool.append(str(NodeKey(layer, pos, rng.randrange(Cs[layer]))))
        out += rng.sample(pool, want)
    return out


async def investigate(inv: Investigator, run: str) -> Findings:
    """The scripted investigation; every step goes through an MCP tool."""
    f = Findings()
    info = await inv.call("get_model_info", {})
    Cs = {x["name"]: int(x["C"]) for x in info["layers"]}
    inv.say(f"model: {info['architecture']['type']}, {len(Cs)} decomposed layers, "
            f"{sum(Cs.values())} components")
    f.prompt, f.label = _pick_probe()
    await inv.log("Question and plan", (
        f"**Question:** {QUESTION}\n\n"
        f"Run `{run}`: {len(Cs)} decomposed layers, {sum(Cs.values())} components.\n\n"
        "Plan: (1) take a held-out pronoun probe and optimise a sparse circuit for the pronoun; "
        "(2) test it under the CI, stochastic, adversarial and ablated regimes against a random "
        "control of the same size; (3) read what the strongest circuit components do across the "
        "dataset; (4) cross-check with a dataset-wide search by output token and its ablation."))

    inv.say(f"probe: …{f.prompt[-60:]!r} → {f.label!r}; optimising a sparse circuit")
    g = await inv.call("optimize_graph", {"text": f.prompt, "label_token": f.label})
    m = g["metrics"]
    f.circuit = [n["key"] for n in g["circuit"]]
    f.n_alive = int(m["n_alive_start"])
    f.graph_probs = {k: float(v) for k, v in m["label_prob"].items()}
    inv.say(f"circuit: {len(f.circuit)} of {f.n_alive} alive nodes; P({f.label}) "
            f"{_fmt_probs(f.graph_probs)}")
    art = await inv.call("save_graph_artifact", {
        "graph_id": g["graph_id"],
        "title": f"Sparse circuit for '{f.label}' after '{f.prompt.split()[-1]}'",
        "caption": f"optimize_graph on a pronoun probe; {len(f.circuit)} component nodes kept."})
    f.artifact_id = art["artifact_id"]
    await inv.log("Sparse circuit", (
        f"Probe: `{f.prompt}` → **{f.label}**.\n\n"
        f"`optimize_graph` kept **{len(f.circuit)} of {f.n_alive}** alive component nodes: "
        f"{', '.join(f'`{k}`' for k in f.circuit)}.\n\n"
        f"P({f.label}): {_fmt_probs(f.graph_probs)}.\n\n{art['reference']}"))

    inv.say("intervening on the circuit under ci / stochastic / adversarial / ablated")
    r = await inv.call("run_intervention", {
        "text": f.prompt, "nodes": f.circuit, "regimes": list(REGIMES), "loss": "label",
        "label_token": f.label})
    f.regime_probs = {k: float(v) for k, v in r["label_prob"].items()}
    natural = await _natural_ci(inv, f.prompt, f.circuit)
    f.control = _random_control(f.circuit, sorted(natural), Cs, random.Random(0))
    c = await inv.call("run_intervention", {
        "text": f.prompt, "nodes": f.control, "regimes": ["ablated"], "loss": "label",
        "label_token": f.label})
    f.control_probs = {k: float(v) for k, v in c["label_prob"].items()}
    inv.say(f"circuit: {_fmt_probs(f.regime_probs)}; random control ablated "
            f"{f.control_probs['ablated']:.3f}")
    await inv.log("Interventions", (
        f"Circuit nodes kept (others masked) / ablated, P({f.label}): "
        f"{_fmt_probs(f.regime_probs)}.\n\n"
        f"Control: ablating {len(f.control)} random alive nodes at the same positions "
        f"({', '.join(f'`{k}`' for k in f.control)}) gives P({f.label}) "
        f"{f.control_probs['ablated']:.3f} (target {f.control_probs['target']:.3f})."))

    comps = list(dict.fromkeys(_component(n) for n in f.circuit))
    a = await inv.call("run_ablation", {"text": f.prompt, "components": comps,
                                        "label_token": f.label})
    f.component_probs = {k: float(v) for k, v in a["label_prob"].items()}
    inv.say(f"ablating the circuit's {len(comps)} components at every position: P({f.label}) "
            f"{_fmt_probs(f.component_probs)}")
    await inv.log("The circuit's components, ablated everywhere", (
        f"A circuit names components at positions; ablating its components "
        f"{', '.join(f'`{k}`' for k in comps)} at every position gives P({f.label}) "
        f"{_fmt_probs(f.component_probs)}."))

    await _contrastive(inv, f)
    await _patching(inv, f)
    await _necessity(inv, f)
    await _components(inv, f, natural)
    await _explanation_ablation(inv, f)
    await _conclude(inv, f)
    return f


def _swap_referent(prompt: str, label: str) -> tuple[str, list[int]] | None:
    """The probe with its last name of the label's gender (every occurrence) swapped for a name
    of the other gender, and the swapped word indices; None when there is no such name."""
    from spd_mcp.model.zoo.tales.corpus import FEMALE_NAMES, GENDER, MALE_NAMES

    gender = {"he": "male", "she": "female"}.get(label)
    words = prompt.split()
    names = [w for w in words if GENDER.get(w) == gender]
    if gender is None or not names:
        return None
    name = names[-1]
    pool = FEMALE_NAMES if gender == "male" else MALE_NAMES
    other = next(n for n in pool if n not in words)
    idx = [i for i, w in enumerate(words) if w == name]
    return " ".join(other if w == name else w for w in words), idx


async def _contrastive(inv: Investigator, f: Findings) -> None:
    """A contrastive circuit on a minimal pair: the probe keeps the label ahead of the other
    pronoun and its counterfactual (the referent's name swapped) the reverse, with one shared
    component set — so no default answer can pass for both."""
    f.contrast = {"he": "she", "she": "he"}.get(f.label, "")
    if not f.contrast:
        return
    swapped = _swap_referent(f.prompt, f.label)
    args: dict[str, Any]
    if swapped is not None:
        f.corrupt = swapped[0]
        args = {"prompts": [
            {"text": f.prompt, "label_token": f.label, "contrast_token": f.contrast},
            {"text": f.corrupt, "label_token": f.contrast, "contrast_token": f.label}]}
        what = "on the minimal pair (the referent's name swapped to the other gender)"
    else:
        args = {"text": f.prompt, "label_token": f.label, "contrast_token": f.contrast}
        what = "on the probe"
    inv.say(f"contrastive circuit {what}: keep {f.label!r} ahead of {f.contrast!r}")
    g = await inv.call("optimize_graph", args)
    f.contrastive = [n["key"] for n in g["circuit"]]
    f.contrastive_claim = g["claim"]
    f.contrastive_diff = {k: float(v) for k, v in (g["metrics"]["logit_diff"] or {}).items()}
    comps = g["components"]
    inv.say(f"contrastive circuit: {len(comps)} shared components; logit({f.label}) − "
            f"logit({f.contrast}) {_fmt_probs(f.contrastive_diff)}")
    await inv.log("Contrastive circuit", (
        f"`optimize_graph` with `contrast_token` {what} keeps {len(comps)} components: "
        f"{', '.join(f'`{k}`' for k in comps)}.\n\n"
        f"Logit difference on the probe: {_fmt_probs(f.contrastive_diff)}.\n\n"
        f"{f.contrastive_claim}"))


async def _patching(inv: Investigator, f: Findings) -> None:
    """Activation patching on a minimal pair: the referent's name swapped to the other gender."""
    swapped = _swap_referent(f.prompt, f.label) if f.contrast else None
    if swapped is None:
        return
    f.corrupt, words = swapped
    tok = await inv.call("tokenize", {"text": f.prompt})
    # word-level tokenizers (tales): word i is token i + 1 after <bos>; otherwise skip positions
    n_tok = len(tok["tokens"])
    if n_tok != len(f.prompt.split()) + 1:
        return
    f.name_positions = [i + 1 for i in words]
    info = await inv.call("get_model_info", {})
    layers = [x["name"] for x in info["layers"]]
    inv.say(f"patching: the name at positions {f.name_positions} swapped to the other gender")
    r = await inv.call("run_patching", {
        "clean": f.prompt, "corrupt": f.corrupt, "label_token": f.label,
        "contrast_token": f.contrast, "direction": "noising",
        "layers_at_positions": [{"layer": la, "positions": f.name_positions}
                                for la in layers],
        "sweep": "layers", "top": 8})
    f.patch_fraction = r["patched"]["fraction_recovered"]
    f.patch_top = [{"patch": x["patch"], "fraction": x["fraction_recovered"]}
                   for x in r["sweep"]["ranked"]]
    fr = "n/a" if f.patch_fraction is None else f"{f.patch_fraction:.2f}"
    inv.say(f"patching every layer at the name moves {fr} of the logit difference; top single "
            f"patches: {', '.join(x['patch'] for x in f.patch_top[:4])}")
    rows = "\n".join(f"- `{x['patch']}`: {x['fraction']:.2f}" for x in f.patch_top
                     if x["fraction"] is not None)
    await inv.log("Patching a minimal pair", (
        f"Corrupt prompt: the referent's name swapped to the other gender (`…{f.corrupt[-60:]}`"
        f"), so the model should prefer '{f.contrast}'. Running the clean prompt with the "
        f"corrupt prompt's values at the name positions {f.name_positions} (every decomposed "
        f"layer; noising) moves {fr} of the logit difference toward the corrupt run. "
        f"Single layer × position patches, largest first (fraction of the difference):\n\n"
        f"{rows}"))


async def _necessity(inv: Investigator, f: Findings) -> None:
    """Grow the smallest set of components whose ablation removes the label (sweep_ablation)."""
    other = {"he": "she", "she": "he"}.get(f.label)
    inv.say("sweeping one-at-a-time ablations of every alive component; growing a necessary set")
    args: dict[str, Any] = {"text": f.prompt, "label_token": f.label, "greedy_steps": GREEDY_STEPS,
                            "stop_prob": STOP_PROB, "random_controls": N_CONTROLS, "top": 10}
    if other:
        args["contrast_token"] = other
    r = await inv.call("sweep_ablation", args)
    f.necessary = list(r["necessary_set"])
    ctrl = r["control"] or {}
    final = r["greedy"][-1]["ablated"] if r["greedy"] else r["target"]
    f.necessary_probs = {"target": float(r["target"]["prob"]), "ablated": float(final["prob"]),
                         "control": float(ctrl.get("prob_mean", float("nan")))}
    inv.say(f"necessary set: {len(f.necessary)} components; P({f.label}) "
            f"{f.necessary_probs['target']:.3f} → {f.necessary_probs['ablated']:.4f} "
            f"(random same-size sets: {f.necessary_probs['control']:.3f})")
    steps = "\n".join(f"{i}. `{g['added']}` → P({f.label}) {g['ablated']['prob']:.4f}"
                      + (f", logit diff vs {other} {g['ablated']['logit_diff']:.2f}"
                         if other else "")
                      for i, g in enumerate(r["greedy"], start=1))
    await inv.log("Necessity: a greedy ablation set", (
        f"`sweep_ablation` ablated each of {r['n_candidates']} alive components everywhere, one "
        f"at a time, then grew a set greedily until P({f.label}) fell to "
        f"{STOP_PROB} × target ({'reached' if r['reached'] else 'not reached'}):\n\n{steps}\n\n"
        f"{N_CONTROLS} random alive sets of the same size per layer: mean P({f.label}) "
        f"{f.necessary_probs['control']:.3f} (min {ctrl.get('prob_min', float('nan')):.3f})."))


async def _explanation_ablation(inv: Investigator, f: Findings) -> None:
    """The explanation names the necessary set and the strongest circuit components; ablate them
    together at every position, as a grader would."""
    f.explanation = list(dict.fromkeys([*f.necessary, *(t["key"] for t in f.top)]))
    a = await inv.call("run_ablation", {"text": f.prompt, "components": f.explanation,
                                        "label_token": f.label})
    f.explanation_probs = {k: float(v) for k, v in a["label_prob"].items()}
    inv.say(f"ablating the explanation's {len(f.explanation)} components everywhere: "
            f"P({f.label}) {_fmt_probs(f.explanation_probs)}")
    await inv.log("The explanation's components, ablated everywhere", (
        f"The explanation names {', '.join(f'`{k}`' for k in f.explanation)} (the necessary set "
        f"and the strongest circuit components). Ablating them at every position gives "
        f"P({f.label}) {_fmt_probs(f.explanation_probs)}."))


async def _components(inv: Investigator, f: Findings,
                      natural: dict[str, tuple[float, float]]) -> None:
    """Knowledge about the strongest circuit components, then a dataset-wide output-token search."""
    ranked = sorted(f.circuit, key=lambda n: natural.get(n, (0.0, 0.0)), reverse=True)
    comps = list(dict.fromkeys(_component(n) for n in ranked))[:N_TOP]
    inv.say(f"reading {', '.join(comps)} (the first call builds the harvest)")
    lines = []
    for key in comps:
        info = await inv.call("get_component_info", {"component": key, "top_k": 5})
        ex = await inv.call("get_component_activation_examples",
                            {"component": key, "limit": 3, "order": "ci"})
        node = next(n for n in ranked if _component(n) == key)
        row = {"key": key, "ci": natural.get(node, (0.0, 0.0))[0],
               "density": float(info["summary"]["density"]),
               "inputs": [t["token"] for t in info["top_input_tokens"]],
               "outputs": [t["token"] for t in info["top_output_tokens"]],
               "example": ex["examples"][0]["text"] if ex["examples"] else ""}
        f.top.append(row)
        lines.append(f"- `{key}` (natural CI {row['ci']:.2f}, density {row['density']:.3f}): "
                     f"fires on {', '.join(row['inputs']) or '—'}; predicts "
                     f"{', '.join(row['outputs']) or '—'}. Example: `{row['example']}`")
    await inv.log("Circuit components across the dataset", "\n".join(lines))

    inv.say(f"searching components by output token {f.label!r} and ablating them")
    s = await inv.call("search_components", {"output_token": f.label, "limit": 10})
    f.searched = [x["key"] for x in s["components"]]
    a = await inv.call("run_ablation", {"text": f.prompt, "components": f.searched,
                                        "label_token": f.label})
    f.search_probs = {k: float(v) for k, v in a["label_prob"].items()}
    overlap = sorted({_component(n) for n in f.circuit} & set(f.searched))
    inv.say(f"ablating the {len(f.searched)} found components: P({f.label}) "
            f"{_fmt_probs(f.search_probs)}")
    await inv.log("Search by output token", (
        f"`search_components(output_token='{f.label}')` ranks by first-order ablation effect: "
        f"{', '.join(f'`{k}`' for k in f.searched)}. Ablating all of them everywhere gives "
        f"P({f.label}) {_fmt_probs(f.search_probs)}. Shared with the circuit: "
        f"{', '.join(f'`{k}`' for k in overlap) or 'none'}."))


async def _conclude(inv: Investigator, f: Findings) -> None:
    p = f.regime_probs
    drop = 1 - p["ablated"] / p["target"]
    control_drop = 1 - f.control_probs["ablated"] / f.control_probs["target"]
    search_drop = 1 - f.search_probs["ablated"] / f.search_probs["target"]
    comp_drop = 1 - f.component_probs["ablated"] / f.component_probs["target"]
    nec = f.necessary_probs
    nec_drop = 1 - nec["ablated"] / nec["target"]
    nec_control_drop = 1 - nec["control"] / nec["target"]
    exp_drop = 1 - f.explanation_probs["ablated"] / f.explanation_probs["target"]
    circuit_comps = {_component(n) for n in f.circuit}
    roles = []
    for key in f.explanation:
        top = next((t for t in f.top if t["key"] == key), None)
        parts = []
        if key in f.necessary:
            parts.append(f"in the greedy necessary set (step {f.necessary.index(key) + 1})")
        if top:
            parts.append(f"strong circuit component at the pronoun position; predicts "
                         f"{', '.join(top['outputs'][:3]) or 'no clear token'}")
        elif key in circuit_comps:
            parts.append(f"member of the sparse circuit for '{f.label}'")
        if key in f.searched:
            parts.append(f"ranked by search_components(output_token='{f.label}')")
        roles.append({"key": key, "role": "; ".join(parts)})
    evidence = [
        {"type": "graph", "value": len(f.circuit), "artifact_id": f.artifact_id,
         "description": f"optimize_graph keeps {len(f.circuit)} of {f.n_alive} alive nodes with "
                        f"CI-masked P({f.label}) {f.graph_probs.get('ci', 0):.3f}"},
        {"type": "intervention", "value": p["ci"],
         "description": f"circuit alone (CI regime) gives P({f.label}) {p['ci']:.3f}; "
                        f"stochastic {p['stochastic']:.3f}, adversarial {p['adversarial']:.3f}"},
        {"type": "intervention", "value": drop,
         "description": f"ablating the circuit's nodes lowers P({f.label}) from "
                        f"{p['target']:.3f} to {p['ablated']:.3f} ({drop:.0%}); a random "
                        f"same-size control: {control_drop:.0%}"},
        {"type": "ablation", "value": comp_drop,
         "description": f"ablating the circuit's components at every position lowers "
                        f"P({f.label}) from {f.component_probs['target']:.3f} to "
                        f"{f.component_probs['ablated']:.3f} ({comp_drop:.0%})"},
        {"type": "ablation", "value": nec_drop,
         "description": f"sweep_ablation's greedy set of {len(f.necessary)} components lowers "
                        f"P({f.label}) from {nec['target']:.3f} to {nec['ablated']:.4f}; "
                        f"{N_CONTROLS} random same-size alive sets: {nec_control_drop:.1%}"},
        {"type": "ablation", "value": exp_drop,
         "description": f"ablating this explanation's {len(f.explanation)} components at every "
                        f"position lowers P({f.label}) from "
                        f"{f.explanation_probs['target']:.3f} to "
                        f"{f.explanation_probs['ablated']:.4f}"},
        *([{"type": "intervention", "value": f.contrastive_diff.get("adversarial"),
            "description": f"contrastive circuit ({len(f.contrastive)} nodes) keeps "
                           f"logit({f.label}) − logit({f.contrast}) at "
                           f"{f.contrastive_diff.get('ci', float('nan')):.2f} under CI masks "
                           f"(target {f.contrastive_diff.get('target', float('nan')):.2f})"}]
          if f.contrastive_diff else []),
        *([{"type": "patching", "value": f.patch_fraction,
            "description": f"patching the referent's name positions from a prompt with a name "
                           f"of the other gender moves {f.patch_fraction:.2f} of the logit "
                           f"difference (noising)"}]
          if f.patch_fraction is not None else []),
        {"type": "ablation", "value": search_drop,
         "description": f"ablating the {len(f.searched)} components found by output token "
                        f"lowers P({f.label}) by {search_drop:.0%}"},
        {"type": "activation_examples", "value": f.top[0]["density"] if f.top else None,
         "description": "; ".join(f"{t['key']} fires on {', '.join(t['inputs'][:3])}"
                                  for t in f.top) or "no harvest statistics"},
    ]
    necessary = exp_drop >= 0.5
    confidence = (0.8 if p["ci"] >= 0.5 and necessary and nec_control_drop < 0.2
                  and control_drop < 0.2 else 0.5)
    await inv.call("save_explanation", {
        "behaviour": f"predicting the pronoun '{f.label}' after '{f.prompt.split()[-1]}' (pronoun "
                     "agreement with the most recently named character)",
        "components": roles, "evidence": evidence, "confidence": confidence,
        "alternatives": ["the gender could be carried by earlier-position components that the "
                         "single-prediction circuit does not separate"],
        "limitations": ["one probe; the circuit and the necessary set are found on one prompt",
                        "necessity is shown; specificity to this behaviour is not tested",
                        "scripted investigator: roles are summarised from statistics"]})
    status = "completed"
    await inv.call("set_investigation_summary", {
        "title": f"Pronoun '{f.label}' circuit",
        "summary": (f"A {len(f.circuit)}-node circuit (of {f.n_alive} alive) predicts "
                    f"'{f.label}' alone (P {p['ci']:.3f}); ablating its nodes gives "
                    f"{p['ablated']:.3f} (target {p['target']:.3f}; random control "
                    f"{f.control_probs['ablated']:.3f}). A greedy ablation sweep finds "
                    f"{len(f.necessary)} components whose ablation gives {nec['ablated']:.4f} "
                    f"(random same-size sets {nec['control']:.3f}). The explanation's "
                    f"{len(f.explanation)} components ablated everywhere: "
                    f"{f.explanation_probs['ablated']:.4f}: "
                    f"{'necessary' if necessary else 'not necessary: the model has other routes'}"
                    f". See [[artifact:{f.artifact_id}]]."),
        "status": status})
    inv.say(f"explanation saved (confidence {confidence}); summary status {status}")


def _report(console: Console, f: Findings, task_path: Path, elapsed: float) -> None:
    from rich.markup import escape
    from rich.table import Table

    console.rule("[bold]spd-mcp demo: scripted investigation")
    console.print(f"[bold]Question:[/bold] {QUESTION}")
    console.print(f"[bold]Probe:[/bold] …{f.prompt[-80:]} → [bold]{f.label}[/bold]")
    console.print(f"[bold]Circuit:[/bold] {len(f.circuit)} of {f.n_alive} alive nodes "
                  f"({len(f.circuit) / max(1, f.n_alive):.1%}); graph artifact "
                  + escape(f"[[artifact:{f.artifact_id}]]"))
    t = Table("regime", f"P({f.label}) circuit", f"P({f.label}) random control",
              title="interventions (label probability)")
    for reg in ("target", *REGIMES):
        ctrl = f.control_probs.get(reg)
        t.add_row(reg, f"{f.regime_probs.get(reg, float('nan')):.3f}",
                  "" if ctrl is None else f"{ctrl:.3f}")
    console.print(t)
    cp, nec, ep = f.component_probs, f.necessary_probs, f.explanation_probs
    nan = float("nan")
    console.print(f"[bold]Circuit's components ablated everywhere:[/bold] P({f.label}) "
                  f"{cp.get('target', nan):.3f} → {cp.get('ablated', nan):.3f}")
    console.print(f"[bold]Necessary set[/bold] ({len(f.necessary)} components, greedy "
                  f"sweep_ablation): P({f.label}) {nec.get('target', nan):.3f} → "
                  f"{nec.get('ablated', nan):.4f}; random same-size sets "
                  f"{nec.get('control', nan):.3f}")
    console.print(f"[bold]Explanation's {len(f.explanation)} components ablated everywhere:"
                  f"[/bold] P({f.label}) {ep.get('target', nan):.3f} → "
                  f"{ep.get('ablated', nan):.4f}")
    ct = Table("component", "natural CI", "density", "top input tokens", "top output tokens",
               title="strongest circuit components")
    for row in f.top:
        ct.add_row(row["key"], f"{row['ci']:.2f}", f"{row['density']:.3f}",
                   ", ".join(row["inputs"][:5]), ", ".join(row["outputs"][:5]))
    console.print(ct)
    if f.contrastive_diff:
        console.print(f"[bold]Contrastive circuit[/bold] ({f.label} − {f.contrast}): "
                      f"{len(f.contrastive)} nodes; logit difference "
                      f"{_fmt_probs(f.contrastive_diff)}")
    if f.patch_fraction is not None:
        console.print(f"[bold]Patching[/bold] the name positions {f.name_positions} from the "
                      f"other-gender prompt moves {f.patch_fraction:.2f} of the logit "
                      f"difference; top single patches: "
                      f"{', '.join(x['patch'] for x in f.patch_top[:4])}")
    console.print(f"[bold]Search by output token:[/bold] {', '.join(f.searched)}; ablated "
                  f"P({f.label}) {f.search_probs.get('ablated', float('nan')):.3f} "
                  f"(target {f.search_probs.get('target', float('nan')):.3f})")
    console.print(f"[bold]Task directory:[/bold] {task_path}  ({elapsed:.0f} s)")


async def _run(run: str, task_path: Path, console: Console, threads: int) -> Findings | str:
    """The investigation's findings, or why a tool failed (caught here, inside the task groups)."""
    from mcp import ClientSession, StdioServerParameters, stdio_client

    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "spd_mcp.cli", "serve", "--run", run, "--task-dir", str(task_path),
              "--threads", str(threads),
              "--job-after", "3600"],  # a scripted client has no timeout: it awaits results
        env=dict(os.environ))
    with open(task_path / "server.log", "a") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            try:
                return await investigate(Investigator(session, console), run)
            except DemoError as err:
                return str(err)


def run_demo(run: str = "tales", root: Path | None = None, threads: int | None = None,
             question: str = QUESTION) -> int:
    """Create a task, investigate it through the MCP server, print the report; 0 on success.

    ``question`` is recorded in the task; the scripted plan itself is fixed."""
    from rich.console import Console
    from rich.markup import escape

    from spd_mcp.investigation.taskdir import create_task

    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # logs and pipes: keep tables and progress lines whole
    t0 = time.perf_counter()
    task = create_task(run, question, root=root, launcher={"kind": "demo"})
    console.print(f"task {task.id}: {task.path}", highlight=False, soft_wrap=True)
    n = threads or int(os.environ.get("SPD_MCP_THREADS") or 1)  # 1: fastest on small CPUs
    f = asyncio.run(_run(run, task.path, console, n))
    if isinstance(f, str):
        console.print(f"[red]demo failed:[/red] {escape(f)}", highlight=False)
        console.print(f"server log: {task.path / 'server.log'}", highlight=False, soft_wrap=True)
        return 1
    _report(console, f, task.path, time.perf_counter() - t0)
    return 0


def add_demo_parser(sub: Any) -> None:
    """``spd-mcp demo [--run RUN] [--root DIR]``."""
    d = sub.add_parser("demo", help="a scripted (LLM-free) investigation through the MCP server")
    d.add_argument("--run", default="tales", help="run directory or name (default: tales)")
    d.add_argument("--root", type=Path, default=None,
                   help="where task directories go (default: $SPD_MCP_HOME/investigations)")
    d.add_argument("--threads", type=int, default=None,
                   help="the server's torch CPU threads (default: $SPD_MCP_THREADS or 1)")
    d.add_argument("--question", default=None,
                   help="question recorded in the task, or @FILE (the scripted plan is fixed)")


def demo_command(args: argparse.Namespace) -> int:
    question = args.question or QUESTION
    if question.startswith("@"):
        question = Path(question[1:]).expanduser().read_text().strip() or QUESTION
    return run_demo(args.run, args.root, args.threads, question)
