"""Activation patching on SPD components: run one prompt with chosen values taken from another.

Patchable values, each per position:
- a component activation a_c(p) = x(p)·V[:, c] of a decomposed matrix (node ``LAYER:POS:C``);
  the run's own weight-delta term x(p) Δᵀ of that matrix is kept;
- a whole matrix output at a position (``LAYER:POS:*``): every component *and* the weight-delta
  term (plus the bias, equal on both prompts), i.e. the source prompt's full output there;
- the token embedding at a position (``embed:POS:0``; the topology's ``embed`` module output).

Everything downstream of a patched value is recomputed. Positions in a :class:`PatchSpec` are
clean-prompt positions; ``pairs`` maps each patchable clean position to a corrupt position.

Directions (Heimersheim & Nanda's convention): ``denoising`` runs the corrupt prompt and patches in
clean values (are these values enough to restore the clean behaviour?); ``noising`` runs the clean
prompt and patches in corrupt values (does corrupting them alone break it?). Metrics are read at
each prompt's last position; ``fraction_recovered`` = (patched − run) / (source − run) of the
logit difference label − contrast (of the label log-probability without a contrast), where run
is the unpatched run prompt and source the other prompt: 0 = no effect, 1 = the patched run
behaves like the source prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from spd_mcp.analysis.sweep import BATCH, LabelMetrics, label_metrics
from spd_mcp.errors import AnalysisError
from spd_mcp.keys import EMBED, NodeKey
from spd_mcp.model.session import RunSession

from .progress import Ticker

Direction = Literal["denoising", "noising"]
SweepMode = Literal["nodes", "components", "layers"]
MAX_SWEEP = 8192
"""Most single-patch variants one sweep runs."""
RTOL, ATOL = 1e-5, 1e-6
"""Values this close on both prompts are treated as equal (patching them changes nothing)."""


class LayerPositions(BaseModel):
    """A whole layer at positions: every component of the matrix plus its weight-delta term."""

    model_config = ConfigDict(extra="forbid")
    layer: str = Field(description="a decomposed layer (e.g. '1.attn.v') or 'embed'")
    positions: list[int] | None = Field(
        None, max_length=4096,
        description="clean-prompt positions (-1 = last); default every patchable position")


@dataclass(frozen=True)
class PatchSpec:
    """What one patched run takes from the source prompt (clean-prompt positions).

    ``nodes``: component activations; ``outputs``: (layer, pos) whose whole output is replaced
    (a matrix's components and delta term, or ``embed`` for the embedding)."""

    nodes: tuple[NodeKey, ...] = ()
    outputs: tuple[tuple[str, int], ...] = ()


class PatchedRun(BaseModel):
    metrics: LabelMetrics
    fraction_recovered: float | None = Field(
        description="(patched - run) / (source - run) of the metric; None when the prompts agree")
    n_nodes: int = Field(description="component activations patched")
    n_outputs: int = Field(description="whole outputs patched (layer or embedding at a position)")


class SweepRow(BaseModel):
    patch: str = Field(description="node 'LAYER:POS:C', component 'LAYER:C', whole layer at a "
                       "position 'LAYER:POS:*', or embedding 'embed:POS:0'")
    value: float = Field(description="the metric with this patch alone")
    change: float = Field(description="value - unpatched run's value")
    fraction_recovered: float | None


class PatchSweep(BaseModel):
    mode: SweepMode
    n_variants: int = Field(description="single patches run")
    n_skipped: int = Field(description="candidates whose values are identical on both prompts "
                           "(e.g. every position before the first difference): patching them "
                           "changes nothing, so they are not run")
    ranked: list[SweepRow] = Field(description="largest |change| first")


class PatchingResult(BaseModel):
    direction: Direction
    run_prompt: Literal["clean", "corrupt"] = Field(description="the prompt that is run")
    metric: Literal["logit_diff", "logprob"] = Field(
        description="what change and fraction_recovered measure")
    label_token: str
    contrast_token: str | None
    clean_tokens: list[str]
    corrupt_tokens: list[str]
    position_map: dict[int, int] | None = Field(
        None, description="clean position → corrupt position (when not aligned)")
    clean: LabelMetrics = Field(description="unpatched clean prompt, at its last position")
    corrupt: LabelMetrics = Field(description="unpatched corrupt prompt, at its last position")
    patched: PatchedRun | None = None
    sweep: PatchSweep | None = None
    notes: list[str] = Field(default_factory=list)


# ----------------------------------------------------------------------------------- recording
@dataclass
class _Record:
    """One unpatched forward: logits (T, V) and per canonical layer its output (T, d_out),
    component activations and natural CI (T, C); ``embed`` in ``outs`` when hookable."""

    logits: Tensor
    outs: dict[str, Tensor]
    acts: dict[str, Tensor]
    ci: dict[str, Tensor]


def embed_module(session: RunSession) -> str | None:
    """Module path of the token embedding (None when the topology has none)."""
    return session.topology.module_of(EMBED)


def patchable_layers(session: RunSession) -> list[str]:
    """Canonical layers whose whole output can be patched: ``embed`` first (when the topology
    has one), then the decomposed layers in forward order."""
    emb = [EMBED] if embed_module(session) is not None and EMBED not in session.keys.Cs else []
    return emb + session.layers


@contextmanager
def _hooks(session: RunSession, fns: dict[str, Callable]) -> Iterator[None]:
    """Forward hooks on the modules of canonical layers (``fn(module, args, out)``)."""
    target = session.cm.target
    handles = []
    try:
        for layer, fn in fns.items():
            path = session.to_module.get(layer) or session.topology.to_module(layer)
            handles.append(target.get_submodule(path).register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _record(session: RunSession, ids: list[int]) -> _Record:
    outs: dict[str, Tensor] = {}
    inputs: dict[str, Tensor] = {}

    def keep(layer: str) -> Callable:
        def fn(_m: torch.nn.Module, args: tuple, out: Tensor) -> None:
            outs[layer] = out[0]
            if layer in session.to_module:
                inputs[session.to_module[layer]] = args[0]

        return fn

    with _hooks(session, {layer: keep(layer) for layer in patchable_layers(session)}):
        logits = session.cm.target(session.ids_tensor(ids))[0]
    cm, canon = session.cm, session.to_canonical
    ci = cm.compute_ci(inputs).lower
    acts = {c: cm.component(m).component_acts(inputs[m])[0] for m, c in canon.items()}
    return _Record(logits, outs, acts, {canon[m]: g[0] for m, g in ci.items()})


# ------------------------------------------------------------------------------------ patching
class Patcher:
    """Batched patched forwards of the run prompt with values from the source prompt."""

    def __init__(self, session: RunSession, clean: list[int], corrupt: list[int],
                 pairs: Sequence[tuple[int, int]], direction: Direction) -> None:
        self.s, self.direction = session, direction
        self.clean, self.corrupt = _record(session, clean), _record(session, corrupt)
        self.pairs = list(pairs)
        denoise = direction == "denoising"
        self.run_ids = corrupt if denoise else clean
        self.src = self.clean if denoise else self.corrupt
        self.to_run = {c: (k if denoise else c) for c, k in self.pairs}
        run_pos = torch.tensor([self.to_run[c] for c, _ in self.pairs], dtype=torch.long)
        src_pos = torch.tensor([c if denoise else k for c, k in self.pairs], dtype=torch.long)
        T = len(self.run_ids)
        self.src_outs = {n: _aligned(o, run_pos, src_pos, T) for n, o in self.src.outs.items()}
        self.src_acts = {n: _aligned(a, run_pos, src_pos, T) for n, a in self.src.acts.items()}

    @torch.no_grad()
    def run(self, specs: Sequence[PatchSpec],
            progress: Callable[[int], None] | None = None) -> Tensor:
        """Logits (len(specs), V) at the run prompt's last position, one row per spec."""
        rows = []
        for start in range(0, len(specs), BATCH):
            chunk = specs[start:start + BATCH]
            rows.append(self._forward(chunk))
            if progress is not None:
                progress(len(chunk))
        return torch.cat(rows)

    def _forward(self, chunk: Sequence[PatchSpec]) -> Tensor:
        s, B, T = self.s, len(chunk), len(self.run_ids)
        node_idx: dict[str, list[tuple[int, int, int]]] = {}
        out_idx: dict[str, list[tuple[int, int]]] = {}
        for b, spec in enumerate(chunk):
            for n in spec.nodes:
                node_idx.setdefault(n.layer, []).append((b, self.to_run[n.pos], n.index))
            for layer, pos in spec.outputs:
                out_idx.setdefault(layer, []).append((b, self.to_run[pos]))
        dev = s.device
        node_sel: dict[str, Tensor] = {}
        for layer, idx in node_idx.items():
            sel = torch.zeros(B, T, s.keys.Cs[layer], device=dev)
            sel[tuple(torch.tensor(idx, device=dev).T)] = 1.0
            node_sel[layer] = sel
        out_sel: dict[str, Tensor] = {}
        for layer, idx2 in out_idx.items():
            mask = torch.zeros(B, T, dtype=torch.bool, device=dev)
            mask[tuple(torch.tensor(idx2, device=dev).T)] = True
            out_sel[layer] = mask.unsqueeze(-1)

        def patch(layer: str) -> Callable:
            comp = s.cm.component(s.to_module[layer]) if layer in s.to_module else None

            def fn(_m: torch.nn.Module, args: tuple, out: Tensor) -> Tensor:
                sel = node_sel.get(layer)
                if sel is not None and comp is not None:  # swap a for a_src: add (a_src − a) U
                    a = comp.component_acts(args[0])
                    out = out + (((self.src_acts[layer] - a) * sel) @ comp.U).to(out.dtype)
                mask = out_sel.get(layer)
                if mask is not None:
                    out = torch.where(mask, self.src_outs[layer], out)
                return out

            return fn

        with _hooks(s, {layer: patch(layer) for layer in {*node_sel, *out_sel}}):
            x = s.ids_tensor(self.run_ids).expand(B, T)
            return s.cm.target(x)[:, -1].float()


def _aligned(values: Tensor, run_pos: Tensor, src_pos: Tensor, T: int) -> Tensor:
    """Source values (T_src, d) laid out at run positions (T, d); zero where unmapped."""
    out = torch.zeros(T, *values.shape[1:], dtype=values.dtype, device=values.device)
    out[run_pos.to(values.device)] = values[src_pos.to(values.device)]
    return out


def _value(m: LabelMetrics) -> float:
    return m.logit_diff if m.logit_diff is not None else m.logprob


def _fraction(value: float, base: float, other: float) -> float | None:
    gap = other - base
    return None if abs(gap) < 1e-6 else round((value - base) / gap, 5)


# --------------------------------------------------------------------------------------- sweeps
def _differs(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise: whether two values differ beyond float tolerance."""
    return ~torch.isclose(a, b, rtol=RTOL, atol=ATOL)


def sweep_candidates(p: Patcher, mode: SweepMode) -> tuple[list[str], list[PatchSpec], int]:
    """(row keys, single-patch specs, candidates skipped as equal on both prompts).

    nodes: each component alive (natural CI > 0) on either prompt at a mapped position;
    components: each component alive on either prompt somewhere, at every mapped
    position; layers: each patchable layer (and the embedding) at each mapped position."""
    s, cl, co = p.s, p.clean, p.corrupt
    cpos = torch.tensor([c for c, _ in p.pairs], dtype=torch.long)
    kpos = torch.tensor([k for _, k in p.pairs], dtype=torch.long)
    keys: list[str] = []
    specs: list[PatchSpec] = []
    skipped = 0
    for layer in patchable_layers(s):
        if layer not in s.keys.Cs and mode != "layers":
            continue
        if mode == "layers" or layer not in s.keys.Cs:  # whole outputs (and the embedding)
            diff = _differs(cl.outs[layer][cpos], co.outs[layer][kpos]).any(-1)  # (P,)
            for i, c in enumerate(cpos.tolist()):
                if not diff[i]:
                    skipped += 1
                    continue
                whole = layer != EMBED or layer in s.keys.Cs  # else the embed node
                keys.append(f"{layer}:{c}:*" if whole else f"{layer}:{c}:0")
                specs.append(PatchSpec(outputs=((layer, c),)))
            continue
        differ = _differs(cl.acts[layer][cpos], co.acts[layer][kpos])  # (P, C)
        if mode == "nodes":
            alive = (cl.ci[layer][cpos] > 0) | (co.ci[layer][kpos] > 0)
            skipped += int((alive & ~differ).sum())
            for i, c in (alive & differ).nonzero().tolist():
                pos = int(cpos[i])
                keys.append(f"{layer}:{pos}:{c}")
                specs.append(PatchSpec(nodes=(NodeKey(layer, pos, c),)))
        else:
            alive = (cl.ci[layer] > 0).any(0) | (co.ci[layer] > 0).any(0)  # (C,)
            moved = differ.any(0)
            skipped += int((alive & ~moved).sum())
            for c in (alive & moved).nonzero().flatten().tolist():
                keys.append(f"{layer}:{c}")
                specs.append(PatchSpec(nodes=tuple(NodeKey(layer, int(q), c) for q in cpos)))
    return keys, specs, skipped


# ----------------------------------------------------------------------------------------- main
@torch.no_grad()
def run_patching(
    session: RunSession,
    clean: list[int],
    corrupt: list[int],
    label: int,
    *,
    contrast: int | None = None,
    spec: PatchSpec | None = None,
    direction: Direction = "denoising",
    position_map: dict[int, int] | None = None,
    sweep: SweepMode | None = None,
    top: int = 20,
    progress: Callable[[int, int], None] | None = None,
) -> PatchingResult:
    """Patch ``spec`` (and/or sweep single patches) between the clean and corrupt prompts.

    ``position_map`` (clean → corrupt position) defaults to the identity, which needs prompts of
    equal length. Positions in ``spec`` are clean positions and must be mapped."""
    if spec is None and sweep is None:
        raise AnalysisError("nothing to patch: give a patch set or a sweep mode")
    if position_map is None:
        if len(clean) != len(corrupt):
            raise AnalysisError(
                f"clean has {len(clean)} tokens and corrupt {len(corrupt)}; aligned patching "
                "needs equal lengths, or give position_map {clean_pos: corrupt_pos}")
        pairs = [(i, i) for i in range(len(clean))]
    else:
        pairs = sorted(position_map.items())
        if any(not (0 <= c < len(clean) and 0 <= k < len(corrupt)) for c, k in pairs):
            raise AnalysisError(f"position_map {position_map} is out of range (clean has "
                                f"{len(clean)} tokens, corrupt {len(corrupt)})")
        if len({k for _, k in pairs}) < len(pairs):
            raise AnalysisError("position_map must be one-to-one")
    mapped = dict(pairs)
    if spec is not None and (bad := sorted({n.pos for n in spec.nodes if n.pos not in mapped}
                                           | {q for _, q in spec.outputs if q not in mapped})):
        raise AnalysisError(f"clean positions {bad} are not in position_map; patchable: "
                            f"{sorted(mapped)}")
    p = Patcher(session, clean, corrupt, pairs, direction)
    cl_m, co_m = label_metrics(
        torch.stack([p.clean.logits[-1], p.corrupt.logits[-1]]), label, contrast)
    base, other = (co_m, cl_m) if direction == "denoising" else (cl_m, co_m)
    b_val, o_val = _value(base), _value(other)
    notes: list[str] = []
    if abs(o_val - b_val) < 1e-6:
        notes.append("the two prompts give the same metric; fraction_recovered is undefined")
    sweep_rows = [] if sweep is None else sweep_candidates(p, sweep)
    n_sweep = len(sweep_rows[1]) if sweep_rows else 0
    if n_sweep > MAX_SWEEP:
        raise AnalysisError(f"sweep {sweep!r} has {n_sweep} candidates (limit {MAX_SWEEP}); use "
                            "sweep='layers', or shorter prompts")
    tick = Ticker(n_sweep + (1 if spec is not None else 0), progress)

    patched = None
    if spec is not None:
        m = label_metrics(p.run([spec], tick), label, contrast)[0]
        patched = PatchedRun(metrics=m, fraction_recovered=_fraction(_value(m), b_val, o_val),
                             n_nodes=len(spec.nodes), n_outputs=len(spec.outputs))
    swept = None
    if sweep is not None:
        keys, specs, skipped = sweep_rows
        rows: list[SweepRow] = []
        if specs:
            for k, m in zip(keys, label_metrics(p.run(specs, tick), label, contrast),
                            strict=True):
                v = _value(m)
                rows.append(SweepRow(patch=k, value=v, change=round(v - b_val, 5),
                                     fraction_recovered=_fraction(v, b_val, o_val)))
        else:
            notes.append("every sweep candidate is equal on both prompts; nothing to patch")
        rows.sort(key=lambda r: -abs(r.change))
        if skipped:
            notes.append(f"{skipped} sweep candidates are identical on both prompts (positions "
                         "before the first differing token, or unchanged values) and were not run")
        if sweep == "nodes":
            notes.append("a node sweep patches alive components only: dead components and the "
                         "weight delta can carry information too; compare with sweep='layers' "
                         "(whole outputs) when the node rows fall short of a layer's")
        elif sweep == "layers":
            notes.append("rows of layers whose whole output at a position fixes another's (an "
                         "MLP's up and down at that position) are equal by construction")
        swept = PatchSweep(mode=sweep, n_variants=len(specs), n_skipped=skipped, ranked=rows[:top])
    tick.finish()
    return PatchingResult(
        direction=direction, run_prompt="corrupt" if direction == "denoising" else "clean",
        metric="logit_diff" if contrast is not None else "logprob",
        label_token=session.token_str(label),
        contrast_token=session.token_str(contrast) if contrast is not None else None,
        clean_tokens=session.tokens(clean), corrupt_tokens=session.tokens(corrupt),
        position_map=dict(pairs) if position_map is not None else None,
        clean=cl_m, corrupt=co_m, patched=patched, sweep=swept, notes=notes)
