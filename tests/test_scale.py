"""The seed-size scale benchmark (``benchmarks/scale.py``) at a tiny size, and the harvest's
seed-size memory paths checked against the small-run ones: sparse component x token tables and
document chunks give the same statistics and answers as dense tables and whole batches."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spd_mcp.harvest import (
    HarvestConfig,
    ShardSpec,
    components_for_token,
    harvest,
    load_harvest,
    merge_shards,
    run_shard,
    top_tokens,
)
from spd_mcp.harvest import accumulate as acc_mod
from spd_mcp.harvest import stats as stats_mod
from spd_mcp.model.session import RunSession
from tests.scripts import load_benchmark

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "scale.py"


def test_exponent_is_the_log_log_slope():
    b = load_benchmark("scale")
    assert b.exponent([1, 2, 4], [3, 12, 48]) == pytest.approx(2.0)
    assert b.exponent([100, 1000], [5, 5]) == pytest.approx(0.0)
    assert b.exponent([10], [1]) is None  # one point fits nothing


def test_tiny_run_through_the_stages(tmp_path, monkeypatch):
    """A tiny synthetic run is a run (loaded by name); its stages report time and memory and the
    exponents are fitted in components (two sizes) and in tokens (three graph lengths)."""
    b = load_benchmark("scale")
    monkeypatch.setenv("SPD_MCP_HOME", str(tmp_path))
    work = tmp_path / "bench"
    a = argparse.Namespace(device="cpu", harvest_tokens=300, label_prompts=2, opt_steps=2,
                           opt_tokens=16, intervene_tokens=16, attr_tokens=16)
    built = b.build_run("tiny", b.SIZES["tiny"], 0.05, work)
    assert built["components"] == b.n_components(b.SIZES["tiny"]) == 512
    session = RunSession.load("tiny")
    assert session.tokenizer.vocab_size == 256 and session.max_len == 64
    stages = {name: b.STAGE_FNS[name]("tiny", work, a)
              for name in ("load", "graph", "get_graph", "harvest", "label")}
    for r in stages.values():
        assert r["seconds"] >= 0
        r["peak_rss_mb"] = 100.0
    assert list(stages["graph"]["by_tokens"]) == ["8", "16", "64"]
    assert stages["harvest"]["tokens"] >= 300 and stages["label"]["prompts_built"] == 2
    assert 0 < stages["load"]["alive_per_token"] < 512
    # a second, twice-as-large size with twice the time and memory: exponent 1 in components
    double = {k: {**r, "seconds": 2 * r["seconds"] + 1e-9 * (r["seconds"] == 0),
                  "peak_rss_mb": 200.0} for k, r in stages.items()}
    for r in stages.values():
        r["seconds"] = r["seconds"] or 1e-9
    result = {"sizes": {"tiny": {"name": "tiny", "components": 512, "stages": stages},
                        "big": {"name": "big", "components": 1024, "stages": double}}}
    exps = b.fit_exponents(result)
    assert exps["in_components"]["graph"]["peak_rss"] == pytest.approx(1.0)
    assert exps["in_tokens"]["tiny"]["graph_time"] is not None
    table = b.markdown({**result, "exponents": exps})
    assert "| harvest |" in table and "graph 64 tok" in table


@pytest.mark.slow  # three fresh processes importing torch: ~10 s
def test_command_line_prints_one_json_object(tmp_path):
    out = tmp_path / "scale.json"
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "tiny", "--stages", "graph", "--threads", "1",
         "--out", str(out), "--markdown"],
        capture_output=True, text=True, timeout=300, check=True)
    res = json.loads(p.stdout)
    assert res == json.loads(out.read_text())
    tiny = res["sizes"]["tiny"]
    assert tiny["components"] == 512 and "error" not in tiny["build"]
    g = tiny["stages"]["graph"]
    assert g["peak_rss_mb"] > 0 and len(g["by_tokens"]) == 3
    assert res["exponents"]["in_tokens"]["tiny"]["graph_edges"] is not None
    assert "| graph |" in p.stderr


# ------------------------------------------------------------------- harvest at seed size
@pytest.fixture(scope="module")
def tales() -> RunSession:
    return RunSession.load("tales")


def _harvest(session, tmp_path, monkeypatch, name, *, sparse: bool, shards: int = 1):
    monkeypatch.setenv("SPD_MCP_HOME", str(tmp_path / name))
    monkeypatch.setattr(stats_mod, "DENSE_SV_LIMIT", 0 if sparse else 1 << 40)
    cfg = HarvestConfig(n_tokens=1500, batch_size=6, n_examples=4)
    if shards == 1:
        harvest(session, cfg)
    else:
        for i in range(shards):
            run_shard(session, cfg, ShardSpec(index=i, count=shards))
        merge_shards(session, cfg)
    return load_harvest(session)


def test_sparse_token_tables_equal_dense_ones(tales, tmp_path, monkeypatch):
    dense = _harvest(tales, tmp_path, monkeypatch, "dense", sparse=False)
    sparse = _harvest(tales, tmp_path, monkeypatch, "sparse", sparse=True)
    st = sparse.stats
    assert st.sparse_tokens and not dense.stats.sparse_tokens
    assert "fire_token" not in st.t and st.t["fire_token_tok"].dtype == torch.int32
    conv = dense.stats.to_sparse_tokens()
    for k in ("fire_token", "fire_pred"):
        for s in stats_mod.SPARSE_SUFFIXES:
            assert torch.equal(st.t[k + s], conv.t[k + s]), k + s
        for i in (0, 7, st.n_components - 1):
            assert torch.equal(st.token_row(k, i), dense.stats.t[k][i])
        for v in (1, 5, 40):
            assert torch.equal(st.token_col(k, v), dense.stats.t[k][:, v])
    comp = int(st.t["fire_count"].argmax())
    for kind in ("input", "output"):
        assert top_tokens(st, comp, kind=kind) == top_tokens(dense.stats, comp, kind=kind)
    tok = int(st.t["token_count"][4:].argmax()) + 4
    assert components_for_token(st, tok) == components_for_token(dense.stats, tok)


def test_chunked_sparse_shards_merge_to_the_whole(tales, tmp_path, monkeypatch):
    """One document per chunk (as at seed size) and sparse tables: two shards merged equal the
    unsharded harvest, and the counts equal the dense, unchunked harvest's."""
    plain = _harvest(tales, tmp_path, monkeypatch, "plain", sparse=False)
    monkeypatch.setattr(acc_mod, "CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(acc_mod, "PAIR_BUFFER", 64)  # merge into the tables every batch
    assert acc_mod.docs_per_chunk(128, 1536) == 1
    whole = _harvest(tales, tmp_path, monkeypatch, "whole", sparse=True)
    merged = _harvest(tales, tmp_path, monkeypatch, "merged", sparse=True, shards=2)
    for k, v in whole.stats.t.items():
        w = merged.stats.t[k]
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, w, rtol=1e-12, atol=1e-9, msg=k)
        else:
            assert torch.equal(v, w), k
    a, b = whole.stats, plain.stats.to_sparse_tokens()
    for k in ("fire_count", "token_count", "pred_count"):
        assert int((a.t[k] - b.t[k]).abs().sum()) <= 4, k  # chunked matmuls may flip a threshold
    for k in ("fire_token_n", "fire_pred_n"):
        assert abs(int(a.t[k].sum()) - int(b.t[k].sum())) <= 4, k


# ------------------------------------------------------------------ graphs at seed size
def test_capped_graph_cut_while_collecting_equals_cut_at_the_end(tales, monkeypatch):
    """Edges cut to the cap while they are collected (as a long prompt of a large run needs)
    give the graph of one cut at the end: the same edges, in order, and the same pruned sums."""
    from spd_mcp.analysis import graph as graph_mod

    ids = tales.encode("once upon a time there was a little girl named lily . she liked to "
                       "play in the park with her ball")
    ci = tales.to_module_dict(tales.natural_ci(ids).ci)

    def capped():
        return graph_mod.compute_graph(tales.cm, tales.topology, ids, ci, max_edges=500)

    at_end = capped()
    monkeypatch.setattr(graph_mod, "_EDGE_SLACK", 50)
    early = capped()
    assert at_end.n_edges == early.n_edges == 500
    for k in ("edge_src", "edge_tgt", "edge_val", "edge_val_abs"):
        assert torch.equal(getattr(at_end, k), getattr(early, k)), k
    scale = float(at_end.node_parts.nan_to_num().abs().max())  # sums in another order
    torch.testing.assert_close(at_end.node_parts, early.node_parts, equal_nan=True,
                               rtol=1e-5, atol=1e-5 * scale)
