"""Editing a target through its components (DESIGN §6): runtime scaling, baked weights, adapters.

An edit never changes the run's weights in place. It is applied as forward hooks on the target's
decomposed modules that add the edited components' change to the exact target output:

    y' = y + Σ_c (s_c − 1) · g_c(x) · (x·v_c) u_c            scaling (g = 1, or [CI_c(x) > τ_c])
           + Σ_c [(x·v'_c) u'_c − (x·v_c) u_c]               rank-1 adapters (trained v', u')
           + x·ΔWᵀ                                           dense matrix edits (baseline only)

so the baseline always includes the weight delta (the target itself), an empty edit is the target
exactly, and leaving the context reverts the edit. Baking adds the same rank-1 changes to the
weight matrices, giving a plain target checkpoint (:mod:`spd_mcp.editing.bake`). CI gates use
the *natural* CI of the input (the unedited model's), computed in a first pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import load, save
from torch import Tensor, nn

from spd_mcp.errors import AnalysisError
from spd_mcp.keys import ComponentKey
from spd_mcp.model.components import Components
from spd_mcp.model.session import RunSession
from spd_mcp.model.text import Forward

MAX_EDIT_COMPONENTS = 256


class ComponentScale(BaseModel):
    """Scale one component: 0 ablates, > 1 boosts; optionally only where its CI > a threshold."""

    model_config = ConfigDict(extra="forbid")
    component: str = Field(description="component key LAYER:C, e.g. '1.mlp.down:17'")
    scale: float = Field(0.0, ge=-10.0, le=10.0, description="0 = ablate, 1 = unchanged, >1 boost")
    ci_threshold: float | None = Field(
        None, ge=0.0, lt=1.0,
        description="apply only at positions where the component's natural CI > threshold "
                    "(None = everywhere)")

    @field_validator("scale")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("scale must be a finite number")
        return v


@dataclass(frozen=True)
class ScaledComponent:
    """One validated scaling of an edit: a component key, its scale, its optional CI gate."""

    key: ComponentKey
    scale: float
    ci_threshold: float | None = None

    def record(self) -> dict[str, Any]:
        """The stored form (the fields of :class:`ComponentScale`)."""
        return {"component": str(self.key), "scale": self.scale,
                "ci_threshold": self.ci_threshold}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ScaledComponent:
        s = ComponentScale.model_validate(record)
        return cls(ComponentKey.parse(s.component), s.scale, s.ci_threshold)


@dataclass
class LayerAdapter:
    """Trained replacement vectors for some components of one layer (canonical layer name)."""

    index: list[int]
    V: Tensor  # (d_in, k) new read vectors
    U: Tensor  # (k, d_out) new write vectors


@dataclass
class Edit:
    """A set of changes to a run's target, addressed by canonical layer names."""

    scales: list[ScaledComponent] = field(default_factory=list)
    adapters: dict[str, LayerAdapter] = field(default_factory=dict)
    dense: dict[str, Tensor] = field(default_factory=dict)
    """layer → additive weight change in the target's layout (the full-matrix baseline)."""

    @property
    def empty(self) -> bool:
        return not self.scales and not self.adapters and not self.dense

    @property
    def gated(self) -> bool:
        return any(s.ci_threshold is not None for s in self.scales)

    def components(self) -> list[str]:
        keys = [str(s.key) for s in self.scales]
        keys += [str(ComponentKey(layer, c)) for layer, a in self.adapters.items() for c in a.index]
        return keys

    def describe(self) -> dict[str, Any]:
        return {
            "scales": [s.record() for s in self.scales],
            "adapters": {layer: a.index for layer, a in self.adapters.items()},
            "dense": sorted(self.dense),
        }

    # ------------------------------------------------------------------------ serialisation
    def tensors_bytes(self) -> bytes | None:
        """Adapter and dense tensors as safetensors bytes (None when there are none)."""
        t: dict[str, Tensor] = {}
        for layer, a in self.adapters.items():
            t[f"adapter.{layer}.V"] = a.V.detach().cpu().contiguous()
            t[f"adapter.{layer}.U"] = a.U.detach().cpu().contiguous()
        for layer, d in self.dense.items():
            t[f"dense.{layer}"] = d.detach().cpu().contiguous()
        return save(t) if t else None

    @classmethod
    def from_record(cls, record: dict[str, Any], blob: bytes | None,
                    device: torch.device | str = "cpu") -> Edit:
        """Inverse of (:meth:`describe`, :meth:`tensors_bytes`)."""
        t = {k: v.to(device) for k, v in load(blob).items()} if blob else {}
        adapters = {
            layer: LayerAdapter(list(idx), t[f"adapter.{layer}.V"], t[f"adapter.{layer}.U"])
            for layer, idx in record.get("adapters", {}).items()
        }
        dense = {layer: t[f"dense.{layer}"] for layer in record.get("dense", [])}
        scales = [ScaledComponent.from_record(s) for s in record.get("scales", [])]
        return cls(scales=scales, adapters=adapters, dense=dense)


def scale_edit(session: RunSession, scales: Sequence[ComponentScale]) -> Edit:
    """Validate component keys (unknown layer / index out of range are errors) into an Edit."""
    if len(scales) > MAX_EDIT_COMPONENTS:
        raise AnalysisError(
            f"an edit may scale at most {MAX_EDIT_COMPONENTS} components, got {len(scales)}")
    seen: set[ComponentKey] = set()
    out = []
    for s in scales:
        key = session.keys.component(s.component)
        if key in seen:
            raise AnalysisError(f"component {key} appears twice in the edit; give it once")
        seen.add(key)
        out.append(ScaledComponent(key, s.scale, s.ci_threshold))
    return Edit(scales=out)


# ------------------------------------------------------------------------------ application
def _read(kind: str, x: Tensor, V: Tensor) -> Tensor:
    """Activations (..., k) of read vectors V (d_in, k) for this layer's input x."""
    return V[x] if kind == "embedding" else x @ V


@dataclass
class _LayerPlan:
    comp: Components
    scale_V: Tensor | None = None  # (d_in, k) read vectors of the scaled components
    scale_U: Tensor | None = None  # (k, d_out)
    scale_idx: Tensor | None = None  # (k,)
    factor: Tensor | None = None  # (k,) = s − 1
    threshold: Tensor | None = None  # (k,) CI threshold; −1 where ungated
    adapter: LayerAdapter | None = None
    old_V: Tensor | None = None  # the adapted components' original vectors
    old_U: Tensor | None = None
    dense: Tensor | None = None


def layer_plans(session: RunSession, edit: Edit) -> dict[str, _LayerPlan]:
    """Module path → what to add in that layer (the run's own vectors enter detached)."""
    cm, dev = session.cm, session.device
    plans: dict[str, _LayerPlan] = {}

    def plan(layer: str) -> _LayerPlan:
        if layer not in session.to_module:
            raise AnalysisError(f"unknown layer {layer!r}; layers: {', '.join(session.layers)}")
        m = session.to_module[layer]
        return plans.setdefault(m, _LayerPlan(cm.component(m)))

    by_layer: dict[str, list[ScaledComponent]] = {}
    for s in edit.scales:
        by_layer.setdefault(s.key.layer, []).append(s)
    for layer, ss in by_layer.items():
        p = plan(layer)
        idx = torch.tensor([s.key.c for s in ss], device=dev)
        p.scale_idx = idx
        p.scale_V, p.scale_U = p.comp.V.detach()[:, idx], p.comp.U.detach()[idx]
        p.factor = torch.tensor([s.scale - 1.0 for s in ss], device=dev)
        p.threshold = torch.tensor(
            [-1.0 if s.ci_threshold is None else s.ci_threshold for s in ss], device=dev)
    for layer, a in edit.adapters.items():
        p = plan(layer)
        idx = torch.tensor(a.index, device=dev, dtype=torch.long)
        p.adapter = a
        p.old_V, p.old_U = p.comp.V.detach()[:, idx], p.comp.U.detach()[idx]
    for layer, d in edit.dense.items():
        plan(layer).dense = d
    return plans


def _make_hook(p: _LayerPlan, ci: dict[str, Tensor] | None, module: str):
    def hook(_mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
        x = args[0]
        kind = p.comp.kind
        add: Tensor | None = None
        if p.scale_V is not None:
            assert p.factor is not None and p.threshold is not None and p.scale_U is not None
            a = _read(kind, x, p.scale_V)  # (..., k)
            f = p.factor
            if ci is not None:
                f = f * (ci[module][..., p.scale_idx] > p.threshold).to(a.dtype)
            add = (a * f) @ p.scale_U
        if p.adapter is not None:
            assert p.old_V is not None and p.old_U is not None
            new = _read(kind, x, p.adapter.V) @ p.adapter.U
            old = _read(kind, x, p.old_V) @ p.old_U
            add = new - old if add is None else add + new - old
        if p.dense is not None:
            d = p.dense[x] if kind == "embedding" else x @ p.dense.T
            add = d if add is None else add + d
        return out if add is None else out + add

    return hook


@contextmanager
def applied(session: RunSession, edit: Edit, x: Tensor | None = None) -> Iterator[None]:
    """Within the context, the run's target computes the edited model.

    ``x`` (the input ids) is required for CI-gated edits: their gates come from the natural CI
    of exactly this input.
    """
    if edit.empty:
        yield
        return
    cm = session.cm
    ci = None
    if edit.gated:
        if x is None:
            raise AnalysisError("a CI-gated edit needs the input to compute its gates")
        with torch.no_grad():
            _, c = cm.ci_for(x)
        ci = c.lower
    plans = layer_plans(session, edit)
    mods = dict(cm.target.named_modules())
    handles = [mods[m].register_forward_hook(_make_hook(p, ci, m)) for m, p in plans.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def edited_logits(session: RunSession, edit: Edit, x: Tensor) -> Tensor:
    """Logits of the edited target for ids x (B, T)."""
    with applied(session, edit, x):
        return session.cm.target(x)


def edited_forward(session: RunSession, edit: Edit | None) -> Forward | None:
    """A forward (ids → logits) of the target under ``edit``; None for no edit (the target)."""
    if edit is None:
        return None
    return lambda x: edited_logits(session, edit, x)
