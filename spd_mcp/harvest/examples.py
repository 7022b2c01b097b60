"""Activation examples of one component, as plain records."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field

from .config import HarvestError
from .store import Harvest


class ActivationExample(BaseModel):
    doc: int = Field(description="dataset document index")
    pos: int = Field(description="position of the firing token in the document (BOS is 0)")
    offset: int = Field(description="index of the firing token inside token_ids / ci")
    token_ids: list[int] = Field(description="window token ids (document edges: shifted)")
    ci: list[float] = Field(description="this component's CI at each window token")
    act: float = Field(description="component activation at the firing token")
    firing_ci: float
    key: float = Field(description="sampling priority in [0, 1) (the sample's random order)")


def component_examples(
    h: Harvest, comp: str | int, *, k: int | None = None,
    order: Literal["random", "ci", "act"] = "random",
) -> list[ActivationExample]:
    """Up to k stored examples of a component: a uniform sample of its firing tokens.

    order: "random" (sampling order), "ci" (firing CI, high first) or "act" (|activation|).
    """
    i = h.stats.index(comp)
    ex = h.examples
    sl = ex.component_slice(i)
    idx = torch.arange(sl.start, sl.stop)
    if order == "ci":
        idx = idx[torch.argsort(-ex.ci[idx, ex.offset[idx]], stable=True)]
    elif order == "act":
        idx = idx[torch.argsort(-ex.act[idx].abs(), stable=True)]
    elif order != "random":
        raise HarvestError(f"order must be 'random', 'ci' or 'act', got {order!r}")
    if k is not None:
        idx = idx[:k]
    scale = float(2 ** h.manifest.key_bits)
    out = []
    for j in idx.tolist():
        toks = ex.tokens[j]
        n = int((toks >= 0).sum())
        off = int(ex.offset[j])
        out.append(ActivationExample(
            doc=int(ex.doc[j]), pos=int(ex.pos[j]), offset=off, token_ids=toks[:n].tolist(),
            ci=[round(float(v), 6) for v in ex.ci[j, :n]], act=float(ex.act[j]),
            firing_ci=float(ex.ci[j, off]), key=float(ex.key[j]) / scale,
        ))
    return out
