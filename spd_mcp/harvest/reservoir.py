"""Uniform activation-example reservoirs by priority sampling.

Every firing event (doc, pos, component) gets a key: a deterministic hash of (seed, doc, pos,
component), uniform on ``[0, 2**key_bits)``. A component keeps the K events with the smallest
keys, ordered by (key, doc, pos) — a uniform sample without replacement of its firing events.
The result does not depend on the order events arrive in, so shards merge exactly: keep the K
smallest across shards.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

_M64 = 1 << 64


def _s64(x: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    return x - _M64 if x >= 1 << 63 else x


_GOLDEN = _s64(0x9E3779B97F4A7C15)
_MIX1 = _s64(0xBF58476D1CE4E5B9)
_MIX2 = _s64(0x94D049BB133111EB)


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: Tensor) -> Tensor:
    """splitmix64 finaliser on int64 tensors (wrapping arithmetic), vectorised."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def key_bits(n_components: int) -> int:
    """Key width so that ``component << bits | key`` fits in a non-negative int64."""
    return 63 - max(1, (n_components - 1).bit_length())


def priority_keys(seed: int, doc: Tensor, pos: Tensor, comp: Tensor, bits: int) -> Tensor:
    """Uniform integer keys in ``[0, 2**bits)`` for events (int64 tensors of equal shape).

    splitmix64(splitmix64(splitmix64(seed) ^ doc) ^ (pos << 40 | comp)): (pos, comp) packs
    exactly for pos < 2**23 and comp < 2**40.
    """
    h0 = int(splitmix64(torch.tensor([seed], dtype=torch.long))[0])
    h = splitmix64(doc ^ h0)
    return _shr(splitmix64(h ^ ((pos << 40) | comp)), 64 - bits)


@dataclass
class Examples:
    """Kept firing events, sorted by (comp, key, doc, pos).

    comp: global component index; key: priority (``key / 2**key_bits`` is uniform on [0, 1));
    doc, pos: where it fired; offset: the firing token's index inside the window (windows are
    shifted, not padded, at document edges, so the offset is not always ``window``); act: the
    component activation at the firing token; tokens: (M, W) window token ids, -1 past the
    document end (only when the document is shorter than W); ci: (M, W) this component's CI at
    each window token (0 where tokens is -1).
    """

    comp: Tensor
    key: Tensor
    doc: Tensor
    pos: Tensor
    offset: Tensor
    act: Tensor
    tokens: Tensor
    ci: Tensor

    @classmethod
    def empty(cls, window_len: int, device: torch.device | str = "cpu") -> Examples:
        i64 = torch.empty(0, dtype=torch.long, device=device)
        return cls(
            comp=i64, key=i64, doc=i64, pos=i64, offset=i64,
            act=torch.empty(0, dtype=torch.float32, device=device),
            tokens=torch.empty(0, window_len, dtype=torch.int32, device=device),
            ci=torch.empty(0, window_len, dtype=torch.float32, device=device),
        )

    def __len__(self) -> int:
        return int(self.comp.shape[0])

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], prefix: str = "") -> Examples:
        return cls(**{f.name: t[prefix + f.name] for f in fields(cls)})

    def to(self, device: torch.device | str) -> Examples:
        return Examples(**{k: v.to(device) for k, v in self.tensors().items()})

    def select(self, idx: Tensor) -> Examples:
        return Examples(**{k: v.index_select(0, idx) for k, v in self.tensors().items()})

    @staticmethod
    def cat(parts: list[Examples]) -> Examples:
        return Examples(
            **{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Examples)}
        )

    def component_slice(self, comp: int) -> slice:
        lo = int(torch.searchsorted(self.comp, comp, side="left"))
        hi = int(torch.searchsorted(self.comp, comp, side="right"))
        return slice(lo, hi)


def _order(comp: Tensor, key: Tensor, doc: Tensor, pos: Tensor, bits: int) -> Tensor:
    """Permutation sorting events by (comp, key, doc, pos)."""
    composite = (comp << bits) | key
    s, order = torch.sort(composite)
    if len(s) > 1 and bool((s[1:] == s[:-1]).any()):  # a key tie: break it by (doc, pos)
        order = torch.sort(pos, stable=True).indices
        order = order[torch.sort(doc[order], stable=True).indices]
        order = order[torch.sort(composite[order], stable=True).indices]
    return order


def keep_smallest(ex: Examples, k: int, bits: int) -> Examples:
    """The k smallest-key events per component, sorted by (comp, key, doc, pos)."""
    if len(ex) == 0:
        return ex
    order = _order(ex.comp, ex.key, ex.doc, ex.pos, bits)
    comp = ex.comp[order]
    rank = torch.arange(len(comp), device=comp.device) - torch.searchsorted(comp, comp)
    return ex.select(order[rank < k])


EMPTY = 1 << 62  # key of an empty slot (larger than any real key)


class Reservoir:
    """The K smallest-key events per component, in dense (S, K) slots (unordered in a row).

    An update decides who enters from keys alone (existing entries of the touched rows plus
    this batch's candidates, ordered by (key, doc, pos)), then writes only the entering events
    into freed slots: the cost grows with the candidates, not with S x K x window.
    """

    def __init__(self, n_components: int, k: int, window_len: int,
                 device: torch.device | str = "cpu") -> None:
        S, K, W = n_components, k, window_len
        self.S, self.K, self.W, self.bits = S, K, W, key_bits(S)
        i64 = {"dtype": torch.long, "device": device}
        self.key = torch.full((S, K), EMPTY, **i64)
        self.doc = torch.zeros((S, K), **i64)
        self.pos = torch.zeros((S, K), **i64)
        self.offset = torch.zeros((S, K), **i64)
        self.act = torch.zeros((S, K), dtype=torch.float32, device=device)
        self.tokens = torch.full((S, K, W), -1, dtype=torch.int32, device=device)
        self.ci = torch.zeros((S, K, W), dtype=torch.float32, device=device)

    def threshold(self) -> Tensor:
        """Per component, an event may enter only if its key is <= this (EMPTY: not full)."""
        return self.key.amax(1)

    def offer(self, comp: Tensor, key: Tensor, doc: Tensor, pos: Tensor
              ) -> tuple[Tensor, Tensor, Tensor]:
        """Admit events; returns (event index, row, slot) of those that entered.

        Their key, doc and pos are stored; the caller stores the rest with :meth:`fill`.
        """
        dev = comp.device
        idx = (key <= self.threshold()[comp]).nonzero().squeeze(1)
        none = torch.empty(0, dtype=torch.long, device=dev)
        if len(idx) == 0:
            return none, none, none
        rows, g = torch.unique(comp[idx], return_inverse=True)
        m, K = len(rows), self.K
        # existing occupied slots of the touched rows, then the candidates
        old_key = self.key[rows].reshape(-1)
        occ = (old_key != EMPTY).nonzero().squeeze(1)
        grp = torch.cat([occ // K, g])
        src = torch.cat([occ, -1 - torch.arange(len(idx), device=dev)])  # slot, or -1 - cand
        kk = torch.cat([old_key[occ], key[idx]])
        dd = torch.cat([self.doc[rows].reshape(-1)[occ], doc[idx]])
        pp = torch.cat([self.pos[rows].reshape(-1)[occ], pos[idx]])
        order = _order(grp, kk, dd, pp, self.bits)
        grp, src = grp[order], src[order]
        kept = torch.arange(len(grp), device=dev) - torch.searchsorted(grp, grp) < K
        enter = kept & (src < 0)
        evicted = src[~kept & (src >= 0)]
        n_enter = torch.bincount(grp[enter], minlength=m)
        if int(n_enter.sum()) == 0:
            return none, none, none
        # free slots: empty ones and evicted ones; the first n_enter[row] of each row are used
        free = old_key == EMPTY
        free[evicted] = True
        free_flat = free.nonzero().squeeze(1)  # sorted by (row, slot)
        frow = free_flat // K
        use = torch.arange(len(free_flat), device=dev) - torch.searchsorted(frow, frow)
        use = use < n_enter[frow]
        row_g, slot = frow[use], free_flat[use] % K  # by row; entering are by row too
        ev = idx[-1 - src[enter]]
        row = rows[row_g]
        gone = rows[evicted // K], evicted % K
        self.key[gone] = EMPTY
        self.key[row, slot], self.doc[row, slot], self.pos[row, slot] = key[ev], doc[ev], pos[ev]
        return ev, row, slot

    def fill(self, row: Tensor, slot: Tensor, offset: Tensor, act: Tensor, tokens: Tensor,
             ci: Tensor) -> None:
        self.offset[row, slot], self.act[row, slot] = offset, act
        self.tokens[row, slot], self.ci[row, slot] = tokens, ci

    def examples(self) -> Examples:
        """All kept events as flat Examples sorted by (comp, key, doc, pos)."""
        K, W = self.K, self.W
        flat = (self.key.reshape(-1) != EMPTY).nonzero().squeeze(1)
        ex = Examples(
            comp=flat // K, key=self.key.reshape(-1)[flat], doc=self.doc.reshape(-1)[flat],
            pos=self.pos.reshape(-1)[flat], offset=self.offset.reshape(-1)[flat],
            act=self.act.reshape(-1)[flat], tokens=self.tokens.reshape(-1, W)[flat],
            ci=self.ci.reshape(-1, W)[flat],
        )
        return keep_smallest(ex, K, self.bits)

    def load(self, ex: Examples) -> None:
        """Replace the contents by ``ex`` (at most K per component are kept)."""
        ex = keep_smallest(ex.to(self.key.device), self.K, self.bits)
        self.key.fill_(EMPTY)
        slot = torch.arange(len(ex), device=ex.comp.device) - torch.searchsorted(ex.comp, ex.comp)
        at = (ex.comp, slot)
        self.key[at], self.doc[at], self.pos[at] = ex.key, ex.doc, ex.pos
        self.fill(ex.comp, slot, ex.offset, ex.act, ex.tokens, ex.ci)
