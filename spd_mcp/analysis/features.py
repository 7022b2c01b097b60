"""Toys with known input features (TMS): the input is a vector of n sparse features, output i
reconstructs feature i, and the target adapter knows one rank-1 piece per feature in some
decomposed matrices (``ground_truth``). Feature inputs instead of text: CI on a feature input,
each component's features, ablated outputs, and matching components to the known pieces."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field
from torch import Tensor

from spd_mcp.errors import AnalysisError
from spd_mcp.keys import ComponentKey, component_key
from spd_mcp.model.session import RunSession

from .components import ActiveComponent, CIResult, ComponentVectors, PositionCI

MEMO = "features/toy"


@dataclass(frozen=True)
class FeatureToy:
    """A run whose inputs are ``n_features`` features and whose output i reconstructs feature i.

    ``truth``: canonical layer → (n_features, *weight shape) known piece of each feature."""

    n_features: int
    truth: dict[str, Tensor]


@torch.no_grad()
def feature_toy(session: RunSession) -> FeatureToy | None:
    """The run's known features (memoised), or None: a language model, no known pieces, or a
    toy whose output is not one value per feature."""
    if MEMO in session.memo:
        found: FeatureToy | None = session.memo[MEMO]
        return found
    toy = None
    target = session.run.target
    if session.text is None and target.entry is not None:
        pieces = target.entry.ground_truth(target.model)
        truth = {session.to_canonical[m]: p.to(session.device).float()
                 for m, p in pieces.items() if m in session.to_canonical}
        sizes = {p.shape[0] for p in truth.values()}
        if len(sizes) == 1:
            n = sizes.pop()
            x = torch.zeros(1, n, device=session.device)
            try:
                out = session.cm(x)
            except (RuntimeError, TypeError, ValueError):
                out = None
            if out is not None and tuple(out.shape) == (1, n):
                toy = FeatureToy(n, truth)
    session.memo[MEMO] = toy
    return toy


def require_feature_toy(session: RunSession) -> FeatureToy:
    """:func:`feature_toy`, or an error saying feature inputs need such a toy."""
    toy = feature_toy(session)
    if toy is None:
        kind = "a language model" if session.text is not None else "a toy without known features"
        raise AnalysisError(f"run {session.run.name!r} is {kind}: feature inputs need a toy "
                            "with known input features such as 'tms-5-2'")
    return toy


def feature_input(session: RunSession, features: Mapping[str, float] | Mapping[int, float],
                  name: str = "features") -> Tensor:
    """A (1, n) input from ``{feature index: value}``; other features are 0."""
    n = require_feature_toy(session).n_features
    if not features:
        raise AnalysisError(f"{name} is empty; give at least one {{index: value}}, e.g. "
                            "{'3': 1.0}")
    x = torch.zeros(1, n, device=session.device)
    for k, v in features.items():
        try:
            i = int(k)
        except ValueError:
            raise AnalysisError(f"{name}: key {k!r} is not a feature index (0..{n - 1})") from None
        if not 0 <= i < n:
            raise AnalysisError(f"{name}: feature {i} out of range (the run has {n} features: "
                                f"0..{n - 1})")
        if not math.isfinite(v):
            raise AnalysisError(f"{name}[{i}]: value {v} is not finite")
        x[0, i] = float(v)
    return x


def describe_input(x: Tensor) -> str:
    """``x = {3: 1.0}``: the non-zero features of one input."""
    nz = {int(i): round(float(x[i]), 4) for i in torch.nonzero(x).flatten().tolist()}
    return f"x = {nz}"


def ablation_masks(session: RunSession, comps: Sequence[ComponentKey]) -> dict[str, Tensor]:
    """Module path → (C,) mask, 0 on ``comps``; layers without one run the exact target."""
    masks: dict[str, Tensor] = {}
    for k in comps:
        m = session.to_module[k.layer]
        if m not in masks:
            masks[m] = torch.ones(session.cm.Cs[m], device=session.device)
        masks[m][k.c] = 0.0
    return masks


@torch.no_grad()
def ablated_output(session: RunSession, x: Tensor, comps: Sequence[ComponentKey] = ()) -> Tensor:
    """The target's output with ``comps`` switched off (weight delta kept; none: the target)."""
    masks = ablation_masks(session, comps)
    return session.cm(x, masks=masks or None, delta_masks=dict.fromkeys(masks, 1.0))


@torch.no_grad()
def feature_ci(session: RunSession, x: Tensor, *, threshold: float = 0.0,
               layers: Sequence[str] | None = None, top: int = 10) -> CIResult:
    """Natural CI and activations of every component on one feature input ``x`` (1, n), as one
    'position' whose token describes the input."""
    _, inputs, acts = session.cm.forward_with_inputs(x, acts=True)
    ci = session.cm.compute_ci(inputs).lower
    assert acts is not None
    names = list(layers) if layers else session.layers
    rows: list[ActiveComponent] = []
    for n in names:
        m = session.to_module[n]
        g, a = ci[m][0], acts[m][0]
        rows += [ActiveComponent(key=component_key(n, c), ci=round(float(g[c]), 4),
                                 act=round(float(a[c]), 4))
                 for c in torch.nonzero(g > threshold).flatten().tolist()]
    rows.sort(key=lambda r: -r.ci)
    label = describe_input(x[0])
    pos = PositionCI(pos=0, token=label, n_active=len(rows), top=rows[:top])
    return CIResult(tokens=[label], threshold=threshold, layers=names, n_active_total=len(rows),
                    positions=[pos], truncated=len(rows) > top)


class FeatureRead(BaseModel):
    feature: int
    act: float = Field(description="the component's activation on the unit input x = e_feature")
    ci: float


class OutputChange(BaseModel):
    output: int
    change: float = Field(description="output with the component ablated minus the target's")


class FeatureView(BaseModel):
    """What a toy component does in terms of the model's input features and outputs."""

    reads: list[FeatureRead] = Field(
        description="input features by |activation| on unit inputs x = e_i (exact target "
                    "upstream)")
    writes: list[OutputChange] = Field(
        description="on the unit input of the feature it reads most: outputs most changed by "
                    "ablating this component alone")
    rule: str = ("output i reconstructs input feature i; a component 'carries' feature i when "
                 "it fires (CI > 0) on x = e_i and ablating it removes output i")


@torch.no_grad()
def feature_view(session: RunSession, key: ComponentKey, *, top_k: int = 5) -> FeatureView:
    """A toy component's reads (activation and CI on each unit feature input) and writes (the
    output change when it alone is ablated on its most-read feature's unit input)."""
    n = require_feature_toy(session).n_features
    m = session.to_module[key.layer]
    eye = torch.eye(n, device=session.device)
    _, inputs, acts = session.cm.forward_with_inputs(eye, acts=True)
    assert acts is not None
    a = acts[m][:, key.c]  # (n,)
    g = session.cm.compute_ci(inputs).lower[m][:, key.c]  # (n,)
    k = min(top_k, n)
    order = a.abs().topk(k).indices.tolist()
    reads = [FeatureRead(feature=i, act=round(float(a[i]), 4), ci=round(float(g[i]), 4))
             for i in order]
    x = eye[order[0]][None]
    change = (ablated_output(session, x, [key]) - session.cm(x))[0]  # (n,)
    writes = [OutputChange(output=j, change=round(float(change[j]), 4))
              for j in change.abs().topk(k).indices.tolist()]
    return FeatureView(reads=reads, writes=writes)


class ComponentFeatures(ComponentVectors):
    features: FeatureView | None = Field(
        None, description="toy runs: the input features it reads and the outputs it writes")


def with_features(session: RunSession, key: ComponentKey, vectors: ComponentVectors,
                  top_k: int) -> ComponentFeatures:
    """``vectors`` with the component's :class:`FeatureView` on a toy with known features."""
    view = feature_view(session, key, top_k=top_k) if feature_toy(session) is not None else None
    return ComponentFeatures(**vectors.model_dump(), features=view)


class FeatureMatch(BaseModel):
    """A component matched to the known feature pieces of its matrix."""

    key: str
    feature: int | None = Field(description="the best-matching feature (None: no known pieces "
                                "in this matrix)")
    cosine: float = Field(description="|cosine| of the component's rank-1 weight with that "
                          "feature's piece")
    scale: float = Field(0.0, description="‖component weight‖ / ‖piece‖ (as ML2R)")


@torch.no_grad()
def match_features(session: RunSession, comps: Sequence[ComponentKey]) -> list[FeatureMatch]:
    """Each component's best-matching known piece: |cosine| between its rank-1 weight and every
    feature's piece in the same matrix (the stricter whole-matrix cosine of ``evaluate``)."""
    truth = require_feature_toy(session).truth
    out = []
    for k in comps:
        pieces = truth.get(k.layer)
        if pieces is None:
            out.append(FeatureMatch(key=str(k), feature=None, cosine=0.0))
            continue
        w = session.cm.component(session.to_module[k.layer]).component_weights()[k.c].flatten()
        t = pieces.flatten(1)  # (n, D)
        cos = (t @ w).abs() / (t.norm(dim=1) * w.norm()).clamp_min(1e-12)
        best = int(cos.argmax())
        scale = float(w.norm() / t[best].norm().clamp_min(1e-12))
        out.append(FeatureMatch(key=str(k), feature=best, cosine=round(float(cos[best]), 4),
                                scale=round(scale, 4)))
    return out


def feature_components(session: RunSession, feature: int) -> list[ComponentKey]:
    """In each matrix with known pieces, the component matched to ``feature`` that carries most
    of its piece (|cosine| × scale): the ground-truth answer (for tests; never shown to an
    agent)."""
    truth = require_feature_toy(session).truth
    out = []
    for layer in truth:
        C = session.keys.Cs[layer]
        matches = match_features(session, [ComponentKey(layer, c) for c in range(C)])
        best = max((mt for mt in matches if mt.feature == feature),
                   key=lambda mt: mt.cosine * mt.scale, default=None)
        if best is not None:
            out.append(session.keys.component(best.key))
    return out
