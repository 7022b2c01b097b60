"""Rank-1 adapter training: make selected components' vectors trainable to change a behaviour.

The selected components' read vectors (V columns) and/or write vectors (U rows) are copied into
trainable adapters; everything else is frozen. Confinement is structural — only those vectors are
leaves the optimiser sees, so no other weight can move (a gradient mask with weight decay or
optimiser state could still leak). Training starts from the exact target (adapter = original
vectors ⇒ the edit adds exactly 0) and minimises

    objective(prompts) + kl_coeff · KL(target ‖ edited) on other text

where the objective raises (−log p) or lowers (−log(1 − p)) given tokens at the prompts' last
positions. ``mode="full_matrix"`` is the baseline: the whole weight matrices of the same layers
are trainable (an additive ΔW), same objective, optimiser and steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from spd_mcp.errors import AnalysisError
from spd_mcp.keys import ComponentKey, layer_of
from spd_mcp.model.session import RunSession
from spd_mcp.model.text import Batch, document_batches, documents, prompt_batch

from .edit import Edit, LayerAdapter, applied

MAX_TRAIN_COMPONENTS = 64
MAX_TARGETS = 256


class EditTarget(BaseModel):
    """One objective term: raise or lower a token's probability after a prompt."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(description="prompt text; the token is predicted after its last word")
    token: str = Field(description="a vocabulary word, e.g. 'blue'")
    direction: Literal["raise", "lower"] = "raise"


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vectors: Literal["read", "write", "both"] = Field(
        "both", description="which vectors become trainable: read (V columns), write (U rows)")
    mode: Literal["components", "full_matrix"] = Field(
        "components", description="full_matrix = baseline: the layers' whole matrices train")
    steps: int = Field(200, ge=1, le=5000)
    lr: float = Field(0.01, gt=0.0, le=1.0)
    kl_coeff: float = Field(5.0, ge=0.0, le=1000.0)
    n_kl_texts: int = Field(64, ge=0, le=2000, description="training-stream documents for the KL")
    kl_batch_size: int = Field(16, ge=1, le=256)


class TargetProb(BaseModel):
    prompt: str
    token: str
    direction: str
    before: float
    after: float
    top1_before: str
    top1_after: str


class TrainReport(BaseModel):
    mode: str
    vectors: str
    components: list[str]
    layers: list[str]
    n_trainable: int = Field(description="number of trainable scalars")
    steps: int
    seconds: float
    objective_before: float
    objective_after: float
    kl_train_text_after: float = Field(description="KL(target ‖ edited) nats/token on the KL text")
    targets: list[TargetProb]
    curve: list[list[float]] = Field(description="[step, objective, kl] at ~10 checkpoints")


def _objective(lp_last: Tensor, tok: Tensor, lower: Tensor) -> Tensor:
    """Mean over prompts of −log p (raise) or −log(1 − p) (lower); lp_last (B, V) log-probs."""
    lp = lp_last.gather(1, tok[:, None])[:, 0]
    lower_loss = -torch.log1p(-lp.exp().clamp(max=1 - 1e-6))
    return torch.where(lower, lower_loss, -lp).mean()


def _kl(target_lp: Tensor, lp: Tensor, mask: Tensor) -> Tensor:
    kl = (target_lp.exp() * (target_lp - lp)).sum(-1)  # (B, T)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def _last_lp(logits: Tensor, b: Batch) -> Tensor:
    rows = torch.arange(logits.shape[0], device=logits.device)
    return F.log_softmax(logits[rows, b.last].float(), -1)


def build_trainable(session: RunSession, components: Sequence[str],
                    settings: TrainSettings) -> tuple[Edit, list[Tensor], list[str]]:
    """The edit whose tensors are the trainable leaves (initialised to the exact target)."""
    if not components:
        raise AnalysisError("give at least one component to train")
    if len(components) > MAX_TRAIN_COMPONENTS:
        raise AnalysisError(
            f"at most {MAX_TRAIN_COMPONENTS} components can be trained, got {len(components)}")
    keys = session.keys.components(list(components))
    by_layer: dict[str, list[int]] = {}
    for k in keys:
        if k.c in by_layer.setdefault(k.layer, []):
            raise AnalysisError(f"component {k} is listed twice")
        by_layer[k.layer].append(k.c)
    edit = Edit()
    leaves: list[Tensor] = []
    for layer, idx in by_layer.items():
        m = session.to_module[layer]
        comp = session.cm.component(m)
        if settings.mode == "full_matrix":
            w = session.cm.target_weight(m)
            d = torch.zeros_like(w, requires_grad=True)
            edit.dense[layer] = d
            leaves.append(d)
            continue
        ix = torch.tensor(idx, device=session.device)
        V = comp.V.detach()[:, ix].clone().requires_grad_(settings.vectors != "write")
        U = comp.U.detach()[ix].clone().requires_grad_(settings.vectors != "read")
        edit.adapters[layer] = LayerAdapter(list(idx), V, U)
        leaves += [t for t in (V, U) if t.requires_grad]
    return edit, leaves, [str(k) for k in keys]


def train_edit(
    session: RunSession,
    components: Sequence[str],
    targets: Sequence[EditTarget],
    settings: TrainSettings | None = None,
    *,
    preserve: Sequence[str] = (),
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Edit, TrainReport]:
    """Train an adapter edit; returns the (detached) edit and a report.

    ``preserve``: prompts whose next-token distributions (every position) must stay as they are;
    their KL joins every step's penalty (a locality set: e.g. the same template with other
    subjects).
    """
    settings = settings or TrainSettings()
    session.require_lm()
    if not targets:
        raise AnalysisError("give at least one target {prompt, token, direction}")
    if len(targets) > MAX_TARGETS or len(preserve) > MAX_TARGETS:
        raise AnalysisError(f"at most {MAX_TARGETS} targets and {MAX_TARGETS} preserve prompts, "
                            f"got {len(targets)} and {len(preserve)}")
    tok = torch.tensor([session.token_id(t.token) for t in targets], device=session.device)
    lower = torch.tensor([t.direction == "lower" for t in targets], device=session.device)
    pb = prompt_batch(session, [t.prompt for t in targets])
    edit, leaves, keys = build_trainable(session, components, settings)
    target = session.cm.target
    t0 = time.time()
    with torch.no_grad():
        base_last = _last_lp(target(pb.ids), pb)
        docs = documents(session, "train", settings.n_kl_texts)
        kl_batches = [(b, F.log_softmax(target(b.ids).float(), -1))
                      for b in document_batches(session, docs, settings.kl_batch_size)]
        keep: tuple[Batch, Tensor] | None = None
        if preserve:
            kb = prompt_batch(session, list(preserve))
            keep = (kb, F.log_softmax(target(kb.ids).float(), -1))
    opt = torch.optim.Adam(leaves, lr=settings.lr)
    curve: list[list[float]] = []
    every = max(1, settings.steps // 10)
    obj0 = float(_objective(base_last, tok, lower))
    # The hooks read the adapter tensors the optimiser updates in place: install them once.
    with applied(session, edit):
        for step in range(settings.steps):
            obj = _objective(_last_lp(target(pb.ids), pb), tok, lower)
            kl = torch.zeros((), device=session.device)
            if kl_batches and settings.kl_coeff > 0:
                b, tlp = kl_batches[step % len(kl_batches)]
                kl = _kl(tlp, F.log_softmax(target(b.ids).float(), -1), b.mask)
            if keep is not None and settings.kl_coeff > 0:
                kb, klp = keep
                kl = kl + _kl(klp, F.log_softmax(target(kb.ids).float(), -1), kb.mask)
            loss = obj + settings.kl_coeff * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % every == 0 or step == settings.steps - 1:
                curve.append([step, round(obj.item(), 5), round(kl.item(), 6)])
            if progress is not None:
                progress(step + 1, settings.steps)
        for leaf in leaves:
            leaf.requires_grad_(False)
        with torch.no_grad():
            after_last = _last_lp(target(pb.ids), pb)
            kl_sum = n_tok = 0.0
            for b, tlp in kl_batches:
                lp = F.log_softmax(target(b.ids).float(), -1)
                n = float(b.mask.sum())
                kl_sum += float(_kl(tlp, lp, b.mask)) * n
                n_tok += n
    rows = []
    for i, t in enumerate(targets):
        rows.append(TargetProb(
            prompt=t.prompt, token=t.token, direction=t.direction,
            before=round(float(base_last[i, tok[i]].exp()), 6),
            after=round(float(after_last[i, tok[i]].exp()), 6),
            top1_before=session.token_str(int(base_last[i].argmax())),
            top1_after=session.token_str(int(after_last[i].argmax()))))
    report = TrainReport(
        mode=settings.mode, vectors=settings.vectors if settings.mode == "components" else "all",
        components=keys, layers=sorted({layer_of(k) for k in keys}),
        n_trainable=sum(t.numel() for t in leaves), steps=settings.steps,
        seconds=round(time.time() - t0, 3), objective_before=round(obj0, 6),
        objective_after=round(float(_objective(after_last, tok, lower)), 6),
        kl_train_text_after=round(kl_sum / max(n_tok, 1.0), 6), targets=rows, curve=curve)
    return edit, report


def rank_for_change(
    session: RunSession, prompts: Sequence[str], current: str, wanted: str, k: int = 4,
) -> list[tuple[str, float]]:
    """Components that most support ``current`` over ``wanted`` after the prompts: the
    first-order change of Σ [log p(current) − log p(wanted)] at the last positions when the
    component is removed at every position (masks all 1 with the delta on = the exact target).
    The natural candidates to train for an edit current → wanted."""
    if not prompts:
        raise AnalysisError("give at least one prompt")
    cm = session.cm
    a, b = session.token_id(current), session.token_id(wanted)
    pb = prompt_batch(session, list(prompts))
    B, T = pb.ids.shape
    masks = {m: torch.ones(B, T, C, device=session.device, requires_grad=True)
             for m, C in cm.Cs.items()}
    with torch.enable_grad():
        lp = _last_lp(cm(pb.ids, masks=masks, delta_masks={m: 1.0 for m in masks}), pb)
        grads = torch.autograd.grad((lp[:, a] - lp[:, b]).sum(), list(masks.values()))
    keys = [str(ComponentKey(session.to_canonical[m], c)) for m, C in cm.Cs.items()
            for c in range(C)]
    eff = torch.cat([(g * pb.mask[..., None]).sum((0, 1)) / B for g in grads])
    top = torch.argsort(eff, descending=True)[:k].tolist()
    return [(keys[i], round(float(eff[i]), 5)) for i in top]
