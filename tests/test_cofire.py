"""Co-firing table: exact block products, exactly the partners any query can return, tales'
answers equal the dense S x S table's, format-1 stages still load, memory linear in components."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from spd_mcp.harvest import (
    HarvestConfig,
    HarvestError,
    HarvestStats,
    ShardSpec,
    config_hash,
    correlated,
)
from spd_mcp.harvest import cofire as cf
from spd_mcp.harvest.runner import merge_shards, resolve_config, run_shard
from spd_mcp.harvest.store import read_result, shards_dir, stage_dir
from spd_mcp.model.session import RunSession


def _dense_correlated(co: torch.Tensor, fire: torch.Tensor, n: int, i: int, by: str, k: int,
                      min_count: int) -> list[tuple]:
    """The oracle: the query as format 1 answered it, on the full row of a dense table."""
    c, fi = co[i], fire[i]
    score = {"count": c.double(), "jaccard": c.double() / (fi + fire - c).clamp(min=1),
             "precision": c.double() / fi.clamp(min=1)}[by].tolist()
    pmi = torch.log(c.double() * n) - torch.log(fi.double()) - torch.log(fire.double())
    recall = c.double() / fire.clamp(min=1)
    cl = c.tolist()
    ok = [j for j, x in enumerate(cl) if j != i and x >= min_count]
    top = sorted(ok, key=lambda j: (-score[j], -cl[j], j))[:k]
    return [(j, int(c[j]), int(fire[j]), float(c[j].double() / (fi + fire[j] - c[j]).clamp(min=1)),
             float(pmi[j]), float(c[j].double() / fi.clamp(min=1)), float(recall[j]))
            for j in top]


def _served(st: HarvestStats, i: int, by: str, k: int, min_count: int) -> list[tuple]:
    return [(a.index, a.count, a.fire_count, a.jaccard, a.pmi, a.precision, a.recall)
            for a in correlated(st, i, by=by, k=k, min_count=min_count)]  # type: ignore[arg-type]


def _stats(co: torch.Tensor, fire: torch.Tensor, n: int, table: dict) -> HarvestStats:
    st = HarvestStats.zeros(["a"], [len(fire)], 1)
    st.n_tokens = n
    st.t["fire_count"] = fire
    st.t.update(table)
    return st


def _random_firing(S: int, N: int, g: torch.Generator) -> torch.Tensor:
    density = torch.rand(S, generator=g) ** 3  # a few dense columns, many sparse, some empty
    density[:3] = 0.0
    return torch.rand(N, S, generator=g) < density


# ------------------------------------------------------------------------------ replay
@pytest.mark.parametrize("speedup", [1e-9, 16.0, 1e9])  # all sparse / mixed / all dense
@pytest.mark.parametrize(("block_rows", "product", "sparse_add"),
                         [(7, 200, 0), (40, 200, 1 << 20), (40, 1 << 22, 0)])
def test_block_products_equal_the_dense_product(monkeypatch, speedup, block_rows, product,
                                                sparse_add):
    monkeypatch.setattr(cf, "_GEMM_SPEEDUP", speedup)
    monkeypatch.setattr(cf, "_PRODUCT", product)  # 200: several chunks per block
    monkeypatch.setattr(cf, "_SPARSE_ADD", sparse_add)  # 0: scatter only nonzeros
    g = torch.Generator().manual_seed(0)
    N, S = 300, 40
    F = _random_firing(S, N, g)
    rows, comps = F.nonzero(as_tuple=True)
    full = (F.double().T @ F.double()).long()
    for lo in range(0, S, block_rows):
        acc = torch.full((min(block_rows, S - lo), S), 7, dtype=torch.long)  # adds onto counts
        for _ in range(2):
            cf.add_block(acc, lo, N, rows, comps)
        assert torch.equal(acc, 7 + 2 * full[lo : lo + block_rows])


def test_log_round_trips_and_resumes_at_a_length(tmp_path: Path):
    g = torch.Generator().manual_seed(1)
    batches = [_random_firing(20, n, g) for n in (5, 0, 9)]
    path = tmp_path / cf.FIRINGS
    with cf.FiringLog(path) as log:
        log.append(5, *batches[0].nonzero(as_tuple=True))
        mark = log.nbytes
        log.append(7, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    with cf.FiringLog(path, mark) as log:  # resumed: the second record is dropped
        log.append(0, *batches[1].nonzero(as_tuple=True))
        log.append(9, *batches[2].nonzero(as_tuple=True))
    got = list(cf.read_log(path))
    assert [n for n, _, _ in got] == [5, 0, 9]
    for (_, rows, comps), F in zip(got, batches, strict=True):
        assert torch.equal(torch.stack([rows, comps]), torch.stack(F.nonzero(as_tuple=True)))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(HarvestError, match="truncated"):
        list(cf.read_log(path))


# ------------------------------------------------------------------------------ reduce
@pytest.mark.parametrize("k", [1, 3])
def test_table_keeps_exactly_the_partners_some_query_returns(monkeypatch, k):
    """The kept set is the union, over rankings and min_count, of the served top-k: nothing
    missing (queries are exact) and nothing more. Rows are longer than one scan chunk."""
    monkeypatch.setattr(cf._kept, "__defaults__", (8,))  # scan chunk w
    g = torch.Generator().manual_seed(2)
    S, N = 36, 40
    F = _random_firing(S, N, g)
    co = (F.long().T @ F.long())
    fire = co.diagonal().clone()
    st = _stats(co, fire, N, cf.table_from_dense(co, fire, k=k))
    for i in range(S):
        want: set[int] = set()
        for by in ("jaccard", "count"):
            for m in range(1, int(fire[i]) + 2):
                top = _dense_correlated(co, fire, N, i, by, k, m)
                assert _served(st, i, by, k, m) == top
                want |= {j for j, *_ in top}
        assert sorted(want) == st.cofire_partners(i)[0].tolist()
    with pytest.raises(HarvestError, match=f"ask k <= {k}"):
        correlated(st, int(fire.argmax()), k=k + 1)


# ------------------------------------------------------------------------------- tales
def test_tales_answers_equal_the_dense_table(monkeypatch, tmp_path):
    """Served co-firing on tales equals format 1's dense table, bit for bit, with the table
    built in one block, in many blocks, or from a format-1 dense matrix."""
    monkeypatch.setenv("SPD_MCP_HOME", str(tmp_path))
    session = RunSession.load("tales")
    cfg = HarvestConfig(n_tokens=3000, batch_size=8)
    run_shard(session, cfg, ShardSpec(index=0, count=1))
    run_id, rcfg = resolve_config(session, cfg)
    chash = config_hash(run_id, rcfg)
    shard = shards_dir(run_id, chash) / "0-of-1"
    _, st0, _ = read_result(shard)
    S, n = st0.n_components, st0.n_tokens
    co = torch.zeros(S, S, dtype=torch.long)  # the oracle: Σ FᵀF over the logged batches
    for n_rows, rows, comps in cf.read_log(shard / cf.FIRINGS):
        F = torch.zeros(n_rows, S, dtype=torch.float64)
        F[rows, comps] = 1.0
        co += (F.T @ F).long()
    assert torch.equal(co.diagonal(), st0.fire_count)  # the log holds exactly the firings
    many = cf.table_from_logs([shard / cf.FIRINGS], st0.fire_count, block_rows=97)

    merge_shards(session, cfg, keep_shards=True)
    st = read_result(stage_dir(run_id, chash))[1]
    alive = (st.fire_count > 0).nonzero().squeeze(1).tolist()
    assert len(alive) > 300
    queries = [(i, "jaccard", 10, 3) for i in alive] + [(i, "jaccard", 50, 1) for i in alive[::2]]
    for i, by, k, m in queries + [(i, "count", 4, 2) for i in alive[1::4]]:
        assert _served(st, i, by, k, m) == _dense_correlated(co, st.fire_count, n, i, by, k, m)
    dense_bytes = S * S * 8
    table_bytes = sum(st.t[f].numel() * st.t[f].element_size() for f in cf.TABLE_FIELDS)
    assert table_bytes < dense_bytes / 10
    for f in cf.TABLE_FIELDS:
        assert torch.equal(many[f], st.t[f]), f
    # a format-1 stage (dense S x S matrix, no table) loads into the same table
    old = {k: v for k, v in st.tensors().items() if k not in cf.TABLE_FIELDS} | {"cofire": co}
    legacy = HarvestStats.from_tensors(old, st.layers, st.offsets, st.vocab_size)
    for f in cf.TABLE_FIELDS:
        assert torch.equal(legacy.t[f], st.t[f]), f
    # a shard without a firing log (format 1) cannot be merged exactly: a clear error
    (shard / cf.FIRINGS).unlink()
    (stage_dir(run_id, chash) / "DONE").unlink()
    with pytest.raises(HarvestError, match="re-run its shards"):
        merge_shards("tales", cfg, 1)


# ------------------------------------------------------------------------------ memory
def test_memory_is_linear_in_components(monkeypatch, tmp_path):
    """Random sparse firing, every component firing ~20 times with ~100 partners: the table
    grows linearly in S (a dense one as S²) and the replay never holds more than
    ``block_rows`` x S counts (the benchmark measures peak RSS up to S = 32k)."""
    shapes: list[tuple[int, ...]] = []
    real = cf.add_block

    def spy(acc: torch.Tensor, *a: object) -> None:
        shapes.append(tuple(acc.shape))
        real(acc, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(cf, "add_block", spy)
    sizes, table_bytes = (1000, 2000, 4000), []
    for S in sizes:
        g = torch.Generator().manual_seed(S)
        N, m = S * 20 // 6, 6
        comps = torch.multinomial(torch.ones(S), N * m, replacement=True, generator=g).view(N, m)
        comps, _ = comps.sort(1)
        new = torch.ones_like(comps, dtype=torch.bool)
        new[:, 1:] = comps[:, 1:] != comps[:, :-1]
        rows, comps = torch.arange(N)[:, None].expand(N, m)[new], comps[new]
        path = tmp_path / f"{S}.bin"
        with cf.FiringLog(path) as log:
            for a in range(0, N, 4096):
                sel = (rows >= a) & (rows < a + 4096)
                log.append(min(4096, N - a), rows[sel] - a, comps[sel])
        shapes.clear()
        t = cf.table_from_logs([path], torch.bincount(comps, minlength=S), block_rows=512)
        assert max(shapes) == (512, S)
        table_bytes.append(sum(v.numel() * v.element_size() for v in t.values()))
    slope = math.log(table_bytes[-1] / table_bytes[0]) / math.log(sizes[-1] / sizes[0])
    assert 0.9 <= slope <= 1.1, (table_bytes, slope)
    assert table_bytes[-1] < sizes[-1] ** 2 * 8 / 30
