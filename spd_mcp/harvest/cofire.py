"""Co-firing ("both fire at the same token") in memory linear in the number of components S.

The full table is S x S counts (13 GB of int64 at 40k components) and co-firing among alive
components is dense (39% of pairs on ``tales``), so a sparse table still grows as S². What is
served is short: one component's top-k partners by Jaccard or by count (= precision), among
partners with count >= min_count. So:

1. Log: each batch appends its firing events (the components firing at each token) to a file in
   its shard directory; it grows with tokens on disk, never in memory.
2. Replay, at merge (so shards merge exactly): rows lo..lo+r-1 of the exact table are summed
   over every shard's log (:func:`add_block`), at most ``block_rows`` rows at a time.
3. Reduce each row: partner j of i is kept when, in some served ranking, fewer than ``k``
   partners with count >= count(i, j) rank above it. For every k' <= k and every min_count the
   served top-k' consists of kept partners, so a query on the kept partners equals the same query
   on the full table, counts and ties included.

Stored (in the stage's statistics): ``cofire_ptr`` (S+1,), ``cofire_idx`` (nnz,) int32 and
``cofire_count`` (nnz,) int64, CSR with each row's partners ascending, the diagonal (= fire
count) left out; ``cofire_k`` the k above. Memory: the table (about 35 partners per component
on ``tales`` at k = 50) plus one block of ``block_rows`` x S int64 while replaying.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch
from torch import Tensor

from .config import HarvestError

FIRINGS = "firings.bin"
TOP_K = 50
"""Partners kept per component and ranking (the most ``get_component_info`` shows)."""
BLOCK_ROWS = 2048
"""Table rows summed at a time while replaying: 16 KiB per component."""
TABLE_FIELDS = ("cofire_ptr", "cofire_idx", "cofire_count", "cofire_k")
_HEAD = struct.Struct("<qq")  # a log record: (n_rows, n_events), then int32 data
_GEMM_SPEEDUP = 16.0  # dense GEMM flops per sparse-matmul flop at equal time (CPU, measured)
_PRODUCT = 1 << 22  # product entries added at a time
_SPARSE_ADD = 1 << 20  # a larger product block adds only its nonzeros when they are few
_CHUNK = 1 << 22  # rows x S reduced at a time


# ------------------------------------------------------------------------------------ log
class FiringLog:
    """Append-only log of each batch's firing events: per record ``(n_rows, n_events)`` as
    int64, then int32 events per token (n_rows,), then int32 components (n_events,) ordered by
    token. ``keep_bytes`` resumes an existing log at a checkpointed length."""

    def __init__(self, path: Path, keep_bytes: int = 0) -> None:
        size = path.stat().st_size if path.exists() else 0
        if size < keep_bytes:
            raise HarvestError(f"{path} holds {size} bytes, its checkpoint needs {keep_bytes}")
        self.path = path
        self._f = open(path, "r+b" if keep_bytes else "wb")  # noqa: SIM115 (closed by close())
        self._f.truncate(keep_bytes)
        self._f.seek(keep_bytes)

    @property
    def nbytes(self) -> int:
        return self._f.tell()

    def append(self, n_rows: int, rows: Tensor, comps: Tensor) -> None:
        """One batch: events (rows, comps) with rows in 0..n_rows-1 ascending."""
        per_row = torch.bincount(rows, minlength=n_rows)
        self._f.write(_HEAD.pack(n_rows, len(comps)))
        for t in (per_row, comps):
            self._f.write(t.to(device="cpu", dtype=torch.int32).numpy().tobytes())

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self.sync()
            self._f.close()

    def __enter__(self) -> FiringLog:
        return self

    def __exit__(self, exc: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def read_log(path: Path, device: torch.device | str = "cpu"
             ) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(n_rows, rows, comps)`` of each batch in a log (rows, comps int64)."""

    def take(f: BinaryIO, n: int) -> Tensor:
        buf = bytearray(4 * n)
        if f.readinto(buf) != len(buf):
            raise HarvestError(f"{path} is truncated; re-run the harvest (or its shard)")
        return torch.frombuffer(buf, dtype=torch.int32) if n else torch.zeros(0, dtype=torch.int32)

    with open(path, "rb") as f:
        while head := f.read(_HEAD.size):
            if len(head) < _HEAD.size:
                raise HarvestError(f"{path} is truncated; re-run the harvest (or its shard)")
            n_rows, n_events = _HEAD.unpack(head)
            per_row, comps = take(f, n_rows), take(f, n_events)
            rows = torch.repeat_interleave(torch.arange(n_rows), per_row.long())
            yield n_rows, rows.to(device), comps.long().to(device)


# --------------------------------------------------------------------------------- replay
def add_block(acc: Tensor, lo: int, n_rows: int, rows: Tensor, comps: Tensor) -> None:
    """Add rows lo..lo+r-1 of FᵀF into ``acc`` (r, S) int64, where F (n_rows, S) is one batch's
    0/1 firing matrix with nonzeros (rows, comps).

    The d most frequent firing components D are dense columns, the other firing components R
    sparse ones (d minimises the estimated cost; on GPUs all are dense). For each chunk B of the
    block's firing components: B∩D x D is a dense GEMM; the sparse product P = R x B gives
    B x R (transposed) and B∩R x B∩D (all of P, untransposed, when B holds R), its rows only the
    sparse columns firing where B fires; B∩R x (D - B) is a sparse product too. Exact: fp32 holds
    integer counts up to n_rows < 2**24.
    """
    r, S = acc.shape
    dev = acc.device
    counts = torch.bincount(comps, minlength=S)
    cols = counts.nonzero().squeeze(1)  # firing components, ascending
    mine = cols[(cols >= lo) & (cols < lo + r)]
    if len(mine) == 0:
        return
    if n_rows >= 1 << 24:
        raise HarvestError("batch too large for exact fp32 co-firing counts")
    n = d = len(cols)
    if dev.type == "cpu":
        cnt = counts[cols].sort(descending=True).values
        rest = cnt.sum() - torch.cat([cnt.new_zeros(1), torch.cumsum(cnt, 0)])
        dd = torch.arange(n + 1, device=dev, dtype=torch.float64)
        d = int(torch.argmin(n_rows * dd**2 / _GEMM_SPEEDUP + rest * n))
    dense = torch.zeros(S, dtype=torch.bool, device=dev)
    dense[cols[torch.argsort(counts[cols], descending=True, stable=True)[:d]]] = True
    dc, sc = cols[dense[cols]], cols[~dense[cols]]  # dense and sparse columns, ascending
    ev_d = dense[comps]
    at = torch.zeros(S, dtype=torch.long, device=dev)  # a column's index in its set

    def ones(cs: Tensor, e: Tensor) -> Tensor:  # (n_rows, len(cs)) 0/1; events e in cs
        at[cs] = torch.arange(len(cs), device=dev)
        f = torch.zeros(n_rows, len(cs), device=dev)
        f[rows[e], at[comps[e]]] = 1.0
        return f

    def sparse(cs: Tensor, e: Tensor) -> Tensor:  # (len(cs), n_rows), the transpose of ones
        at[cs] = torch.arange(len(cs), device=dev)
        return torch.sparse_coo_tensor(torch.stack([at[comps[e]], rows[e]]),
                                       torch.ones(int(e.sum()), device=dev),
                                       (len(cs), n_rows), check_invariants=False)

    def add(rc: Tensor, cc: Tensor, block: Tensor, *, t: bool = False) -> None:
        """acc[rc, cc] += block (len(rc), len(cc)), or its transpose ``block`` if ``t``; only
        the nonzeros of a large, mostly 0 block (sparse firing leaves most of a product 0)."""
        if block.numel() > _SPARSE_ADD and 4 * int(torch.count_nonzero(block)) < block.numel():
            i, j = block.nonzero(as_tuple=True)
            r_, c_ = (j, i) if t else (i, j)
            acc.view(-1).index_add_(0, (rc[r_] - lo) * S + cc[c_], block[i, j].to(torch.int64))
            return
        at_ = (rc - lo)[:, None] * S + cc[None, :]
        acc.view(-1).index_add_(0, (at_.T if t else at_).reshape(-1),
                                block.reshape(-1).to(torch.int64))

    f_d = None
    step = max(1, _PRODUCT // n)
    for a in range(0, len(mine), step):
        b = mine[a : a + step]
        ev = (comps >= b[0]) & (comps <= b[-1])
        bd, bs = b[dense[b]], b[~dense[b]]
        k = len(bd)
        f_b = ones(torch.cat([bd, bs]), ev)  # (n_rows, len(b)), dense columns first
        if k == d:  # B holds D
            f_d = f_b[:, :k]
        elif f_d is None:
            f_d = ones(dc, ev_d)  # (n_rows, d)
        if k:
            add(bd, dc, f_b[:, :k].T @ f_d)
        hit = torch.zeros(n_rows, dtype=torch.bool, device=dev)
        hit[rows[ev]] = True
        e = hit[rows] & ~ev_d  # sparse events at the tokens where B fires
        if bool(e.any()):
            met = torch.unique(comps[e])  # the sparse columns meeting B (they include B∩R)
            prod = torch.mm(sparse(met, e), f_b)  # (len(met), len(b)): R x B
            add(bd, met, prod[:, :k], t=True)
            if len(bs) == len(sc):  # B holds R: R x B lands on the block's own rows
                add(met, torch.cat([bd, bs]), prod)
            else:
                add(bs, met, prod[:, k:], t=True)
                add(bs, bd, prod[torch.searchsorted(met, bs), :k])
        far = dc[(dc < b[0]) | (dc > b[-1])]  # D - B
        if len(bs) and len(far):
            add(bs, far, torch.mm(sparse(bs, ev & ~ev_d), f_d[:, torch.searchsorted(dc, far)]))


# --------------------------------------------------------------------------------- reduce
def jaccard(co: Tensor, fi: Tensor, fj: Tensor) -> Tensor:
    """count / (tokens where either fires), fp64 (shared by the table and its queries)."""
    return co.double() / (fi + fj - co).clamp(min=1)


def _kept(count: Tensor, score: Tensor | None, k: int, w: int = 64) -> Tensor:
    """Rows (n, L) of entries (count 0: none): those with fewer than k entries of their row, of
    count >= theirs, ranked above them by (score desc, count desc, position asc); ``score`` None
    ranks by count alone (then that is the top k)."""
    L = count.shape[1]
    if score is None:  # top k by the unique key (count, -position)
        key = count * L + torch.arange(L - 1, -1, -1, device=count.device)
        top = torch.topk(key, min(k, L), dim=1).indices
        return torch.zeros_like(count, dtype=torch.bool).scatter_(1, top, True) & (count > 0)
    order = torch.argsort(-count, dim=1, stable=True)
    order = order.gather(1, torch.argsort(-score.gather(1, order), dim=1, stable=True))
    ranked = count.gather(1, order)  # counts in rank order
    suffix_max = torch.flip(torch.cummax(torch.flip(ranked, [1]), 1).values, [1])
    top = torch.zeros(len(count), k, dtype=count.dtype, device=count.device)  # k largest so far
    earlier = torch.ones(w, w, dtype=torch.bool, device=count.device).tril(-1)  # [p, q]: q < p
    keep = torch.zeros_like(ranked, dtype=torch.bool)
    for p in range(0, ranked.shape[1], w):
        live = (top[:, -1] < suffix_max[:, p]).nonzero().squeeze(1)  # rows with more to keep
        if len(live) == 0:
            break
        ch, t = ranked[live, p : p + w], top[live]  # (n_live, W), (n_live, k)
        W = ch.shape[1]
        above = ((t[:, None, :] >= ch[:, :, None]).sum(2)
                 + ((ch[:, None, :] >= ch[:, :, None]) & earlier[:W, :W]).sum(2))
        keep[live, p : p + W] = (above < k) & (ch > 0)
        top[live] = torch.topk(torch.cat([t, ch], 1), k, dim=1).values
    return torch.zeros_like(keep).scatter_(1, order, keep)


def _reduce(co: Tensor, lo: int, fire: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(global row, partner, count) of the kept partners of table rows lo.. given as ``co``."""
    parts = []
    step = max(1, _CHUNK // co.shape[1])
    for a in range(0, co.shape[0], step):
        block = co[a : a + step]
        row, col = block.nonzero(as_tuple=True)  # row-major: partners ascending
        off = col != lo + a + row
        row, col = row[off], col[off]
        if len(row) == 0:
            continue
        c, g = block[row, col], lo + a + row
        per_row = torch.bincount(row, minlength=len(block))
        pos = torch.arange(len(row), device=co.device) - (torch.cumsum(per_row, 0) - per_row)[row]
        counts = torch.zeros(len(block), int(per_row.max()), dtype=c.dtype, device=co.device)
        counts[row, pos] = c  # each row's partners, left-aligned
        jac = torch.full(counts.shape, -math.inf, dtype=torch.float64, device=co.device)
        jac[row, pos] = jaccard(c, fire[g], fire[col])
        keep = (_kept(counts, jac, k) | _kept(counts, None, k))[row, pos]
        parts.append((g[keep], col[keep], c[keep]))
    if not parts:
        empty = torch.zeros(0, dtype=torch.int64, device=co.device)
        return empty, empty, empty
    g, col, c = (torch.cat(x) for x in zip(*parts, strict=True))
    return g, col, c


def _table(parts: list[tuple[Tensor, Tensor, Tensor]], S: int, k: int) -> dict[str, Tensor]:
    g, col, c = ([torch.cat(x).cpu() for x in zip(*parts, strict=True)] if parts
                 else [torch.zeros(0, dtype=torch.int64)] * 3)
    ptr = torch.cat([torch.zeros(1, dtype=torch.int64),
                     torch.cumsum(torch.bincount(g, minlength=S), 0)])
    return {"cofire_ptr": ptr, "cofire_idx": col.to(torch.int32), "cofire_count": c,
            "cofire_k": torch.tensor(k, dtype=torch.int64)}


def table_from_logs(
    logs: list[Path], fire_count: Tensor, *, k: int = TOP_K, block_rows: int = BLOCK_ROWS,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """The co-firing table of the harvest whose firing events are ``logs`` (any order)."""
    S = len(fire_count)
    fire = fire_count.to(device)
    parts = []
    for lo in range(0, S, block_rows):
        hi = min(S, lo + block_rows)
        if not bool((fire[lo:hi] > 0).any()):
            continue
        acc = torch.zeros(hi - lo, S, dtype=torch.int64, device=device)
        for path in logs:
            for n_rows, rows, comps in read_log(path, device):
                add_block(acc, lo, n_rows, rows, comps)
        if not torch.equal(acc.diagonal(lo), fire[lo:hi]):  # (i, lo + i): the fire counts
            raise HarvestError("the firing logs do not match the fire counts (a stray or "
                               "corrupt log); re-run the harvest")
        parts.append(_reduce(acc, lo, fire, k))
        del acc
    return _table(parts, S, k)


def table_from_dense(co: Tensor, fire_count: Tensor, *, k: int = TOP_K) -> dict[str, Tensor]:
    """The table of a full S x S count matrix (harvest format 1 stored that)."""
    return _table([_reduce(co, 0, fire_count, k)], len(fire_count), k)
