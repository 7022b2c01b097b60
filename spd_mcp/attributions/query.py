"""Queries over a loaded attribution stage (vectorised over all sources / targets).

Keys: a component is ``"{layer}:{c}"`` (canonical, e.g. ``0.mlp.up:17``); an input token (a
source) is ``"embed:{token_id}"`` and an output token (a target) ``"output:{token_id}"``; with a
``tokenizer`` a bare vocabulary word (or ``embed:{word}`` / ``output:{word}``) works too, read as
an input token where a source is expected and as an output token where a target is.

Normalisation (at query time; the stage stores raw sums):
- ``raw``: the sum over the sample;
- ``mean``: per token of the sample (raw / n_tokens);
- ``fraction``: raw / the target's total |attribution| over every source (components and input
  tokens), so a target's sources' |fractions| sum to 1.
Ranking: ``signed=True`` by value (most positive first), ``signed=False`` by |value|. Entries of
value exactly 0 (e.g. a source downstream of the target) are never listed.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel
from torch import Tensor

from spd_mcp.keys import EMBED, OUTPUT, component_key, split_first, split_last, token_key

from .config import AttributionError
from .store import Attributions

Kind = Literal["component", "input_token", "output_token"]
Normalize = Literal["raw", "mean", "fraction"]
_NORMALIZE = ("raw", "mean", "fraction")


class AttributionEntry(BaseModel):
    """One source or target in a query result."""

    kind: Kind
    key: str
    token: str | None = None
    value: float
    raw: float


# ------------------------------------------------------------------------------------ keys
def _token_id(attr: Attributions, text: str, tokenizer: Any, key: str) -> int:
    try:
        tid = int(text)
    except ValueError:
        if tokenizer is None:
            raise AttributionError(
                f"{key!r}: {text!r} is not a token id; pass a tokenizer to use words"
            ) from None
        tid = int(tokenizer.token_to_id(text))
        if tid == tokenizer.unk_id and text != "<unk>":
            raise AttributionError(f"{key!r}: {text!r} is not in the vocabulary") from None
    if not 0 <= tid < attr.vocab_size:
        raise AttributionError(f"{key!r}: token id {tid} out of range (vocab {attr.vocab_size})")
    return tid


def resolve_key(attr: Attributions, key: str, role: Literal["source", "target"],
                tokenizer: Any = None) -> tuple[Kind, int]:
    """(kind, global component index or token id) of a key used as a source or a target."""
    if not isinstance(key, str) or not key:
        raise AttributionError(f"key {key!r} must be a non-empty string")
    layer, rest = split_last(key) or ("", key)
    if layer in attr.layers:
        li = attr.layers.index(layer)
        C = attr.offsets[li + 1] - attr.offsets[li]
        try:
            c = int(rest)
        except ValueError:
            raise AttributionError(f"{key!r}: component index {rest!r} is not an integer") from None
        if not 0 <= c < C:
            raise AttributionError(
                f"{key!r}: component index {c} out of range for {layer} (C={C}: 0..{C - 1})")
        return "component", attr.offsets[li] + c
    prefix, word = split_first(key) or ("", key)
    tok_kind: Kind = "input_token" if role == "source" else "output_token"
    if prefix in (EMBED, OUTPUT):
        want = EMBED if role == "source" else OUTPUT
        if prefix != want:
            raise AttributionError(
                f"{key!r}: {prefix} tokens are only {'sources' if prefix == EMBED else 'targets'}"
                f"; as a {role} use '{want}:<token>'")
        return tok_kind, _token_id(attr, word, tokenizer, key)
    if tokenizer is not None:
        return tok_kind, _token_id(attr, key, tokenizer, key)
    raise AttributionError(
        f"unknown key {key!r}: use a component 'LAYER:C' (layers: {', '.join(attr.layers)}), "
        f"'embed:<token id>' (a source) or 'output:<token id>' (a target)"
        + ("" if tokenizer is not None else "; words need a tokenizer"))


def _component_key(attr: Attributions, s: int) -> str:
    li = bisect.bisect_right(attr.offsets, s) - 1
    return component_key(attr.layers[li], s - attr.offsets[li])


def _entry(attr: Attributions, kind: Kind, idx: int, value: float, raw: float,
           tokenizer: Any) -> AttributionEntry:
    if kind == "component":
        return AttributionEntry(kind=kind, key=_component_key(attr, idx), value=value, raw=raw)
    key = token_key(EMBED if kind == "input_token" else OUTPUT, idx)
    tok = None if tokenizer is None else str(tokenizer.id_to_token(idx))
    return AttributionEntry(kind=kind, key=key, token=tok, value=value, raw=raw)


# --------------------------------------------------------------------------------- queries
def _check(normalize: str, k: int) -> None:
    if normalize not in _NORMALIZE:
        raise AttributionError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
    if k < 1:
        raise AttributionError(f"k must be >= 1, got {k}")


def _scale(attr: Attributions, normalize: str, kind: Kind, idx: Tensor | int) -> Tensor:
    """Divisor(s) for targets ``idx`` of ``kind`` under ``normalize``."""
    if normalize == "raw":
        return torch.tensor(1.0, dtype=torch.float64)
    if normalize == "mean":
        return torch.tensor(float(max(attr.sums.n_tokens, 1)), dtype=torch.float64)
    totals = attr.component_totals if kind == "component" else attr.output_totals
    t = totals[idx]
    return torch.where(t > 0, t, torch.ones_like(t))


def _top(attr: Attributions, parts: list[tuple[Kind, Tensor, Tensor]], k: int, signed: bool,
         tokenizer: Any) -> list[AttributionEntry]:
    """parts: (kind, raw values, normalised values) per block of candidates."""
    raw = torch.cat([p[1] for p in parts])
    val = torch.cat([p[2] for p in parts])
    score = (val if signed else val.abs()).clone()
    score[raw == 0] = -torch.inf
    n = min(k, int((raw != 0).sum()))
    if n == 0:
        return []
    top = score.topk(n).indices.tolist()
    starts = [0]
    for p in parts:
        starts.append(starts[-1] + int(p[1].numel()))
    out = []
    for i in top:
        b = bisect.bisect_right(starts, i) - 1
        out.append(_entry(attr, parts[b][0], i - starts[b], float(val[i]), float(raw[i]),
                          tokenizer))
    return out


def _kinds(include: Sequence[Kind] | None, allowed: tuple[Kind, Kind]) -> set[Kind]:
    if include is None:
        return set(allowed)
    bad = [x for x in include if x not in allowed]
    if bad:
        raise AttributionError(f"include: {bad} not among {list(allowed)}")
    return set(include)


def top_sources(attr: Attributions, target_key: str, k: int = 10, *, signed: bool = True,
                normalize: Normalize = "raw", tokenizer: Any = None,
                include: Sequence[Kind] | None = None) -> list[AttributionEntry]:
    """The ``k`` strongest sources (components, input tokens) of a component or output token.

    include: restrict to ``"component"`` and/or ``"input_token"`` sources.
    """
    _check(normalize, k)
    kind, t = resolve_key(attr, target_key, "target", tokenizer)
    cc, tc = ("comp_comp", "token_comp") if kind == "component" else ("comp_output",
                                                                      "token_output")
    scale = _scale(attr, normalize, kind, t)
    wanted = _kinds(include, ("component", "input_token"))
    parts: list[tuple[Kind, Tensor, Tensor]] = []
    for sk, name in (("component", cc), ("input_token", tc)):
        col = attr[name][:, t]
        if sk not in wanted:
            col = torch.zeros_like(col)
        parts.append((sk, col, col / scale))  # type: ignore[arg-type]
    return _top(attr, parts, k, signed, tokenizer)


def top_targets(attr: Attributions, source_key: str, k: int = 10, *, signed: bool = True,
                normalize: Normalize = "raw", tokenizer: Any = None,
                include: Sequence[Kind] | None = None) -> list[AttributionEntry]:
    """The ``k`` strongest targets (components, output tokens) of a component or input token.

    include: restrict to ``"component"`` and/or ``"output_token"`` targets.
    """
    _check(normalize, k)
    kind, s = resolve_key(attr, source_key, "source", tokenizer)
    cc, co = ("comp_comp", "comp_output") if kind == "component" else ("token_comp",
                                                                       "token_output")
    wanted = _kinds(include, ("component", "output_token"))
    parts: list[tuple[Kind, Tensor, Tensor]] = []
    for tk, name in (("component", cc), ("output_token", co)):
        row = attr[name][s]
        if tk not in wanted:
            row = torch.zeros_like(row)
        scale = _scale(attr, normalize, tk, torch.arange(row.numel()))  # type: ignore[arg-type]
        parts.append((tk, row, row / scale))  # type: ignore[arg-type]
    return _top(attr, parts, k, signed, tokenizer)


def strength(attr: Attributions, source_key: str, target_key: str, *,
             normalize: Normalize = "raw", tokenizer: Any = None) -> float:
    """The attribution of one source to one target (0 where the source is not upstream)."""
    _check(normalize, 1)
    sk, s = resolve_key(attr, source_key, "source", tokenizer)
    tk, t = resolve_key(attr, target_key, "target", tokenizer)
    name = {("component", "component"): "comp_comp", ("input_token", "component"): "token_comp",
            ("component", "output_token"): "comp_output",
            ("input_token", "output_token"): "token_output"}[(sk, tk)]
    return float(attr[name][s, t] / _scale(attr, normalize, tk, t))
