"""Editing a target through its components (DESIGN §6): runtime scaling, baked weights, adapters.

An edit never changes the run's weights in place. It is applied as forward hooks on the target's
decomposed modules that add the edited components' change to the exact target output:

    y' = y + Σ_c (s_c − 1) · g_c(x) · (x·v_c) u_c            scaling (g = 1, or [CI_c(x) > τ_c])
           + Σ_c [(x·v'_c) u'_c − (x·v_c) u_c]               rank-1 adapters (trained v', u')
           + x·ΔWᵀ                                           dense matrix edits (baseline only)

so the baseline always includes the weight delta (the target itself), an empty edit is the target
exactly, and leaving the context reverts the edit. Baking adds the same rank-1 changes to the
weight matrices, giving a plain target checkpoint. CI gates use the *natural* CI of the input (the
unedited model's), computed in a first pass.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import load, save, save_file
from torch import Tensor, nn

from spd_mcp.model.components import Components
from spd_mcp.model.run_io import publish_dir

from .session import AnalysisError, RunSession

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


@dataclass
class LayerAdapter:
    """Trained replacement vectors for some components of one layer (canonical layer name)."""

    index: list[int]
    V: Tensor  # (d_in, k) new read vectors
    U: Tensor  # (k, d_out) new write vectors


@dataclass
class Edit:
    """A set of changes to a run's target, addressed by canonical layer names."""

    scales: list[ComponentScale] = field(default_factory=list)
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
        keys = [s.component for s in self.scales]
        keys += [f"{layer}:{c}" for layer, a in self.adapters.items() for c in a.index]
        return keys

    def describe(self) -> dict[str, Any]:
        return {
            "scales": [s.model_dump() for s in self.scales],
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
        scales = [ComponentScale.model_validate(s) for s in record.get("scales", [])]
        return cls(scales=scales, adapters=adapters, dense=dense)


def scale_edit(session: RunSession, scales: Sequence[ComponentScale]) -> Edit:
    """Validate component keys (unknown layer / index out of range are errors) into an Edit."""
    if len(scales) > MAX_EDIT_COMPONENTS:
        raise AnalysisError(
            f"an edit may scale at most {MAX_EDIT_COMPONENTS} components, got {len(scales)}")
    seen: set[str] = set()
    out = []
    for s in scales:
        key = session.keys.component(s.component)
        canon = f"{key.layer}:{key.c}"
        if canon in seen:
            raise AnalysisError(f"component {canon} appears twice in the edit; give it once")
        seen.add(canon)
        out.append(s.model_copy(update={"component": canon}))
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


def _plans(session: RunSession, edit: Edit) -> dict[str, _LayerPlan]:
    """Module path → what to add in that layer (the run's own vectors enter detached)."""
    cm, dev = session.cm, session.device
    plans: dict[str, _LayerPlan] = {}

    def plan(layer: str) -> _LayerPlan:
        if layer not in session.to_module:
            raise AnalysisError(f"unknown layer {layer!r}; layers: {', '.join(session.layers)}")
        m = session.to_module[layer]
        return plans.setdefault(m, _LayerPlan(cm.component(m)))

    by_layer: dict[str, list[ComponentScale]] = {}
    for s in edit.scales:
        layer = s.component.rsplit(":", 1)[0]
        by_layer.setdefault(layer, []).append(s)
    for layer, ss in by_layer.items():
        p = plan(layer)
        idx = torch.tensor([int(s.component.rsplit(":", 1)[1]) for s in ss], device=dev)
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
    plans = _plans(session, edit)
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


# ------------------------------------------------------------------------------------ baking
def weight_changes(session: RunSession, edit: Edit) -> dict[str, Tensor]:
    """Module path → additive change of its weight (target layout) that bakes the edit."""
    if edit.gated:
        gated = [s.component for s in edit.scales if s.ci_threshold is not None]
        raise AnalysisError(
            f"cannot bake a CI-gated edit ({', '.join(gated[:5])}): its effect depends on the "
            "input. Bake the ungated edit (ci_threshold=None) or apply it at runtime")
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for m, p in _plans(session, edit).items():
            comp = p.comp
            VU = torch.zeros(comp.d_in, comp.d_out, device=session.device)
            if p.scale_V is not None:
                assert p.factor is not None and p.scale_U is not None
                VU += (p.scale_V * p.factor) @ p.scale_U
            if p.adapter is not None:
                assert p.old_V is not None and p.old_U is not None
                VU += p.adapter.V.detach() @ p.adapter.U.detach() - p.old_V @ p.old_U
            change = comp.target_shaped(VU)
            if p.dense is not None:
                change = change + p.dense.detach()
            out[m] = change
    return out


def baked_target_state(session: RunSession, edit: Edit) -> dict[str, Tensor]:
    """The target's state dict with the edit baked into its weights (CPU copies)."""
    changes = weight_changes(session, edit)
    state = {k: v.detach().clone() for k, v in session.cm.target.state_dict().items()}
    for m, change in changes.items():
        state[f"{m}.weight"] = state[f"{m}.weight"] + change
    return {k: v.cpu().contiguous() for k, v in state.items()}


EDITED_TARGET_FILE = "target.safetensors"
EDITED_META_FILE = "edited_target.json"


def export_baked(session: RunSession, edit: Edit, out: Path, *, note: dict[str, Any] | None = None,
                 overwrite: bool = False) -> Path:
    """Write a standalone target checkpoint (weights + target spec + tokenizer) atomically."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise AnalysisError(f"{out} already exists; choose another directory or overwrite")
    state = baked_target_state(session, edit)
    with publish_dir(out) as tmp:
        save_file(state, str(tmp / EDITED_TARGET_FILE))
        entry = session.run.target.entry
        if entry is not None:
            entry.save_extras(tmp)
        meta = {
            "kind": "spd-mcp edited target",
            "target": session.run.meta["target"],
            "source_run": {"name": session.run.name, "run_id": session.run.meta.get("run_id")},
            "edit": edit.describe(),
            "note": note or {},
        }
        (tmp / EDITED_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_edited_target(path: Path, *, device: str = "cpu") -> nn.Module:
    """Load a checkpoint written by :func:`export_baked` as a plain target module (no SPD)."""
    from pydantic import TypeAdapter

    from spd_mcp.model.config import ImportTarget, ZooTarget
    from spd_mcp.model.targets import resolve_target

    path = Path(path)
    meta_file = path / EDITED_META_FILE
    if not meta_file.is_file():
        raise AnalysisError(f"{path} is not an exported edited target (no {EDITED_META_FILE})")
    meta = json.loads(meta_file.read_text())
    spec = TypeAdapter(ZooTarget | ImportTarget).validate_python(meta["target"])
    resolved = resolve_target(spec, weights=path / EDITED_TARGET_FILE, run_dir=path)
    return resolved.model.to(device).eval()
