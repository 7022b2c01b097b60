"""Harvest: exact shard merging, uniform reservoirs, derived statistics, windows, resume, reuse."""

from __future__ import annotations

import math

import pytest
import torch

from spd_mcp.cli import main
from spd_mcp.harvest import (
    HarvestConfig,
    HarvestError,
    HarvestInterrupted,
    HarvestNotFound,
    HarvestStats,
    ShardSpec,
    component_examples,
    component_summary,
    components_for_token,
    config_hash,
    correlated,
    harvest,
    load_harvest,
    merge_shards,
    run_shard,
    top_tokens,
)
from spd_mcp.harvest import accumulate as acc_mod
from spd_mcp.harvest.cofire import FIRINGS, table_from_dense
from spd_mcp.harvest.reservoir import Examples, Reservoir, keep_smallest, key_bits, priority_keys
from spd_mcp.harvest.runner import resolve_config
from spd_mcp.harvest.store import CHECKPOINT, Harvest, read_result, shards_dir, stage_dir
from spd_mcp.model.session import RunSession


@pytest.fixture(scope="module")
def session() -> RunSession:
    return RunSession.load("tales")


def _assert_same(a, b, *, exact_floats: bool) -> None:
    assert a.stats.n_tokens == b.stats.n_tokens
    for k, v in a.stats.t.items():
        w = b.stats.t[k]
        if v.dtype.is_floating_point and not exact_floats:
            torch.testing.assert_close(v, w, rtol=1e-12, atol=1e-9, msg=k)
        else:
            assert torch.equal(v, w), k
    for k, v in a.examples.tensors().items():
        assert torch.equal(v, b.examples.tensors()[k]), k


def _home(monkeypatch, tmp_path, name: str) -> None:
    monkeypatch.setenv("SPD_MCP_HOME", str(tmp_path / name))


# ----------------------------------------------------------------------------------- (a)
def test_three_shards_merge_to_the_unsharded_harvest(session, monkeypatch, tmp_path):
    cfg = HarvestConfig(n_tokens=4000, batch_size=8, n_examples=6)
    _home(monkeypatch, tmp_path, "whole")
    assert harvest(session, cfg).status == "harvested"
    whole = load_harvest(session)
    assert whole.stats.n_tokens >= 4000
    assert whole.manifest.plan.n_batches >= 6

    _home(monkeypatch, tmp_path, "sharded")
    for i in (2, 0):
        run_shard(session, cfg, ShardSpec(index=i, count=3))
    with pytest.raises(HarvestError, match=r"1/3"):
        merge_shards("tales", cfg)
    run_shard(session, cfg, ShardSpec(index=1, count=3))
    assert merge_shards("tales", cfg).status == "harvested"  # by name: no model needed
    merged = load_harvest("tales")
    _assert_same(whole, merged, exact_floats=False)
    assert merged.manifest.plan.n_shards == 3
    assert not shards_dir(merged.manifest.run_id, merged.config_hash).exists()

    st = merged.stats
    i = torch.repeat_interleave(torch.arange(st.n_components), st.cofire_ptr.diff())
    both = torch.minimum(st.fire_count[i], st.fire_count[st.cofire_idx.long()])
    assert bool(((st.cofire_count > 0) & (st.cofire_count <= both)).all())
    assert torch.equal(st.fire_token.sum(1), st.fire_count)
    assert torch.equal(st.fire_pred.sum(1), st.fire_count)
    assert int(st.token_count.sum()) == int(st.pred_count.sum()) == st.n_tokens
    assert int(st.token_count[session.tokenizer.pad_id]) == 0  # pads are excluded
    assert int(st.token_count[session.tokenizer.bos_id]) == merged.manifest.n_docs
    # every component keeps min(n_examples, fire_count) examples
    kept = torch.bincount(merged.examples.comp, minlength=st.n_components)
    assert torch.equal(kept, st.fire_count.clamp(max=6))


# ----------------------------------------------------------------------------------- (b)
def test_priority_reservoir_is_a_uniform_sample_without_replacement():
    """Inclusion frequencies over 300 seeds match K/N (binomial z-scores and chi-square)."""
    K, counts, n_seeds = 8, [5, 40, 160], 300
    comp = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    ev = torch.cat([torch.arange(n) for n in counts])
    doc, pos = ev // 50, ev % 50
    S, bits = len(counts), key_bits(len(counts))
    offsets = torch.tensor([0, *counts]).cumsum(0)

    def events(idx: torch.Tensor, keys: torch.Tensor) -> Examples:
        return Examples(comp=comp[idx], key=keys[idx], doc=doc[idx], pos=pos[idx],
                        offset=torch.zeros_like(idx), act=torch.zeros(len(idx)),
                        tokens=torch.zeros(len(idx), 1, dtype=torch.int32),
                        ci=torch.zeros(len(idx), 1))

    hits = torch.zeros(len(comp), dtype=torch.long)
    for seed in range(n_seeds):
        keys = priority_keys(seed, doc, pos, comp, bits)
        res = Reservoir(S, K, 1)
        perm = torch.randperm(len(comp), generator=torch.Generator().manual_seed(seed))
        for chunk in perm.chunk(5):  # streamed in a random arrival order, in batches
            ev, row, slot = res.offer(comp[chunk], keys[chunk], doc[chunk], pos[chunk])
            assert torch.equal(row, comp[chunk][ev])
            res.fill(row, slot, offset=slot, act=torch.zeros(len(ev)),
                     tokens=torch.zeros(len(ev), 1, dtype=torch.int32), ci=torch.zeros(len(ev), 1))
        kept = res.examples()
        assert torch.equal(torch.bincount(kept.comp, minlength=S),
                           torch.tensor([min(K, n) for n in counts]))
        # streaming equals selecting from all events at once (order-independent => exact merge)
        assert torch.equal(keep_smallest(events(torch.arange(len(comp)), keys), K, bits).key,
                           kept.key)
        hits[offsets[kept.comp] + kept.doc * 50 + kept.pos] += 1
    start = 0
    for n in counts:
        h = hits[start : start + n].double()
        start += n
        if n <= K:
            assert torch.all(h == n_seeds)
            continue
        p = K / n
        z = (h - n_seeds * p) / math.sqrt(n_seeds * p * (1 - p))
        assert float(z.abs().max()) < 4.5
        chi2 = float((z**2).sum())  # ≈ chi-square with n - 1 dof (the total is fixed)
        dof = n - 1
        assert abs(chi2 - dof) < 5 * math.sqrt(2 * dof), (n, chi2)
        # no bias by arrival order: first vs second half of the stream
        assert abs(float(h[: n // 2].mean() - h[n // 2 :].mean())) < 0.1 * n_seeds * p


def test_reservoir_breaks_key_ties_by_doc_and_pos():
    """Equal keys (impossible to arrange with real hashes) still give an order-free result."""
    n, K = 60, 7
    doc, pos = torch.arange(n) // 4, torch.arange(n) % 4
    comp, key = torch.zeros(n, dtype=torch.long), torch.full((n,), 5)
    for seed in range(3):
        res = Reservoir(2, K, 1)
        for chunk in torch.randperm(n, generator=torch.Generator().manual_seed(seed)).chunk(4):
            res.offer(comp[chunk], key[chunk], doc[chunk], pos[chunk])
        kept = res.key[0] != 2**62
        got = sorted(zip(res.doc[0][kept].tolist(), res.pos[0][kept].tolist(), strict=True))
        assert got == [(i // 4, i % 4) for i in range(K)]


# ----------------------------------------------------------------------------------- (c)
def _hand_stats() -> HarvestStats:
    """Layers a (C=2), b (C=1); vocab 3; 10 tokens. Numbers chosen by hand."""
    st = HarvestStats.zeros(["a", "b"], [2, 1], 3)
    st.n_tokens = 10
    st.t["fire_count"][:] = torch.tensor([4, 2, 5])
    st.t["token_count"][:] = torch.tensor([5, 3, 2])
    st.t["fire_token"][:] = torch.tensor([[3, 1, 0], [0, 1, 1], [2, 1, 2]])
    st.t["pred_count"][:] = torch.tensor([2, 4, 4])
    st.t["fire_pred"][:] = torch.tensor([[0, 0, 4], [1, 1, 0], [1, 2, 2]])
    st.t.update(table_from_dense(torch.tensor([[4, 2, 1], [2, 2, 0], [1, 0, 5]]),
                                 st.t["fire_count"]))
    st.t["sum_ci"][:] = torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64)
    return st


def test_token_and_cofiring_statistics_match_hand_computation():
    st = _hand_stats()
    assert st.index("b:0") == 2 and st.key(1) == "a:1"
    with pytest.raises(ValueError, match="unknown layer"):
        st.index("c:0")
    assert st.density().tolist() == [0.4, 0.2, 0.5]
    assert st.mean_ci().tolist() == [0.2, 0.1, 0.3]

    # a:0 with input tokens: joint [3, 1, 0], fire 4, token counts [5, 3, 2], n 10
    by_pmi = top_tokens(st, "a:0", by="pmi")
    assert [t.token_id for t in by_pmi] == [0, 1]  # token 2 never co-occurs
    t0 = by_pmi[0]
    assert t0.count == 3 and t0.token_count == 5
    assert t0.precision == pytest.approx(0.75)  # 3 / 4
    assert t0.recall == pytest.approx(0.6)  # 3 / 5
    assert t0.pmi == pytest.approx(math.log(1.5))  # 3*10 / (4*5)
    assert by_pmi[1].pmi == pytest.approx(math.log(10 / 12))  # 1*10 / (4*3)
    assert top_tokens(st, "a:0", by="pmi", min_count=2)[0].token_id == 0
    assert len(top_tokens(st, "a:0", by="pmi", min_count=2)) == 1
    # b:0: recall [2/5, 1/3, 2/2] -> token 2 first; precision [2/5, 1/5, 2/5] -> tie by count
    assert [t.token_id for t in top_tokens(st, "b:0", by="recall")] == [2, 0, 1]
    assert top_tokens(st, 2, by="precision", k=2)[0].precision == pytest.approx(0.4)
    # output tokens of a:0: joint [0, 0, 4], pred counts [2, 4, 4]
    out = top_tokens(st, "a:0", kind="output", by="precision")
    assert [t.token_id for t in out] == [2]
    assert out[0].precision == 1.0 and out[0].recall == 1.0
    assert out[0].pmi == pytest.approx(math.log(4 * 10 / (4 * 4)))

    co = correlated(st, "a:0", by="jaccard")
    assert [c.key for c in co] == ["a:1", "b:0"]
    assert co[0].jaccard == pytest.approx(2 / (4 + 2 - 2))
    assert co[1].jaccard == pytest.approx(1 / (4 + 5 - 1))
    assert co[0].pmi == pytest.approx(math.log(2 * 10 / (4 * 2)))
    assert co[1].pmi == pytest.approx(math.log(1 * 10 / (4 * 5)))
    assert co[0].precision == pytest.approx(0.5) and co[0].recall == pytest.approx(1.0)
    assert [c.key for c in correlated(st, "a:1")] == ["a:0"]  # never co-fires with b:0

    comps = components_for_token(st, 2, by="recall")  # joint [0, 1, 2] / token count 2
    assert [(c.key, c.recall) for c in comps] == [("b:0", 1.0), ("a:1", 0.5)]
    with pytest.raises(HarvestError, match="by must be"):
        top_tokens(st, 0, by="bogus")  # type: ignore[arg-type]


def test_smoothed_pmi_matches_hand_computation_and_breaks_recall_ties():
    st = _hand_stats()
    a = 10.0  # PMI_PRIOR
    # tokens of b:0 (fire 5 of 10): joint [2, 1, 2], token counts [5, 3, 2]; token 2 has recall 1
    toks = {t.token_id: t for t in top_tokens(st, "b:0", by="smoothed_pmi")}
    for v, (j, n_v) in enumerate([(2, 5), (1, 3), (2, 2)]):
        assert toks[v].smoothed_pmi == pytest.approx(math.log((j + a * 0.5) / (n_v + a) / 0.5))
    # components of token 2 (P = 2/10): joint [0, 1, 2], fire counts [4, 2, 5]
    comps = {c.key: c for c in components_for_token(st, 2, by="smoothed_pmi")}
    assert comps["b:0"].smoothed_pmi == pytest.approx(math.log((2 + a * 0.2) / (5 + a) / 0.2))
    assert comps["a:1"].smoothed_pmi == pytest.approx(math.log((1 + a * 0.2) / (2 + a) / 0.2))
    # tokens 0 and 1 always fire the component (recall 1): raw PMI ties, smoothed PMI does not
    one = HarvestStats.zeros(["a"], [1], 3)
    one.n_tokens = 100
    one.t["fire_count"][:] = torch.tensor([20])
    one.t["token_count"][:] = torch.tensor([5, 2, 50])
    one.t["fire_token"][:] = torch.tensor([[5, 2, 10]])
    ranked = top_tokens(one, "a:0", by="smoothed_pmi")
    assert [t.token_id for t in ranked] == [0, 1, 2]
    assert ranked[0].pmi == pytest.approx(ranked[1].pmi) == pytest.approx(math.log(100 / 20))
    assert ranked[0].smoothed_pmi == pytest.approx(math.log((5 + 2) / 15 / 0.2))
    assert ranked[1].smoothed_pmi == pytest.approx(math.log((2 + 2) / 12 / 0.2))
    assert ranked[2].smoothed_pmi == pytest.approx(0.0)  # 10 of 50: the base rate exactly


def test_positive_firing_fraction_and_older_harvests(session, tmp_path, monkeypatch):
    _home(monkeypatch, tmp_path, "pos")
    harvest(session, HarvestConfig(n_tokens=400, batch_size=4))
    h = load_harvest(session)
    pos, fire = h.stats.t["pos_fire_count"], h.stats.t["fire_count"]
    assert bool((pos <= fire).all()) and 0 < int(pos.sum()) < int(fire.sum())
    # recount by hand: firing (CI > threshold) tokens with activation > 0, one document at a time
    thr = h.manifest.config.fire_threshold
    want = torch.zeros_like(pos)
    for d in range(h.manifest.n_docs):
        nat = session.natural_ci(acc_mod.encode_doc(session, d))
        ci = torch.cat([nat.ci[n] for n in session.layers], -1)
        act = torch.cat([nat.acts[n] for n in session.layers], -1)
        want += ((ci > thr) & (act > 0)).sum(0)
    assert int((want - pos).abs().sum()) <= 2  # batched vs single forwards may differ at the edge
    i = int(fire.argmax())
    summary = component_summary(h.stats, i)
    assert summary.frac_positive_when_firing == pytest.approx(int(pos[i]) / int(fire[i]))
    # a harvest stored before the field existed still loads; the fraction is then unknown
    t = {k: v for k, v in h.stats.tensors().items() if k != "pos_fire_count"}
    old = HarvestStats.from_tensors(t, h.stats.layers, h.stats.offsets, h.stats.vocab_size)
    assert "pos_fire_count" not in old.t
    assert component_summary(old, i).frac_positive_when_firing is None
    merged = old + h.stats
    assert merged.n_tokens == 2 * h.stats.n_tokens and "pos_fire_count" not in merged.t


# ----------------------------------------------------------------------------------- (d)
@pytest.mark.parametrize("window", [8, 70])
def test_edge_windows_point_at_the_firing_token(session, window):
    cfg = HarvestConfig(n_tokens=150 if window == 70 else 400, batch_size=4, window=window,
                        n_examples=30 if window == 70 else 200).resolved(0.1)
    acc = acc_mod.Accumulator(session, cfg)
    n_docs = 0
    while acc.stats.n_tokens < cfg.n_tokens:
        acc.process(*acc_mod.make_batch(session, range(n_docs, n_docs + 2)))
        n_docs += 2
    ex = acc.examples
    W = cfg.window_len
    assert torch.equal(torch.bincount(ex.comp, minlength=acc.S),
                       acc.stats.fire_count.clamp(max=cfg.n_examples))
    checked = set()
    for d in range(n_docs):
        ids = acc_mod.encode_doc(session, d)
        L = len(ids)
        nat = session.natural_ci(ids)
        ci_doc = torch.cat([nat.ci[layer] for layer in session.layers], 1)  # (L, S)
        for pos in (0, 1, L - 1):
            sel = ((ex.doc == d) & (ex.pos == pos)).nonzero().squeeze(1)
            assert len(sel) > 0
            for j in sel.tolist():
                off, comp = int(ex.offset[j]), int(ex.comp[j])
                lo = pos - off
                toks = ex.tokens[j].tolist()
                assert toks[off] == ids[pos]
                assert lo == max(0, min(pos - window, L - W))  # shifted inside the document
                expect = ids[lo : lo + W] + [-1] * max(0, lo + W - L)
                assert toks == expect
                inside = torch.tensor(expect) >= 0
                torch.testing.assert_close(
                    ex.ci[j][inside], ci_doc[lo : lo + int(inside.sum()), comp],
                    atol=1e-5, rtol=0,
                )
                assert float(ex.ci[j][off]) > cfg.fire_threshold - 1e-6
                assert torch.all(ex.ci[j][~inside] == 0)
                checked.add((pos == 0, pos == 1, pos == L - 1, W > L))
    assert {c[:3] for c in checked} == {(True, False, False), (False, True, False),
                                        (False, False, True)}
    if window == 70:
        assert any(c[3] for c in checked)  # a window longer than its document: -1 padded


# ----------------------------------------------------------------------------------- (e)
@pytest.mark.parametrize("count", [1, 2])  # streamed unsharded run / planned shard
def test_interrupted_shard_resumes_from_its_checkpoint(session, monkeypatch, tmp_path, count):
    cfg = HarvestConfig(n_tokens=2500, batch_size=3, n_examples=5)
    shard = ShardSpec(index=0, count=count)
    _home(monkeypatch, tmp_path, "straight")
    run_shard(session, cfg, shard)
    straight = load_harvest_shard(session, cfg, shard)
    n_batches = len(range(0, straight.manifest.plan.n_batches, count))
    assert n_batches >= 6

    _home(monkeypatch, tmp_path, "resumed")
    with pytest.raises(HarvestInterrupted):
        run_shard(session, cfg, shard, checkpoint_every=2, stop_after_batches=3)
    out = shards_dir(straight.manifest.run_id, straight.config_hash) / shard.name
    assert (out / CHECKPOINT).exists() and not (out / "DONE").exists()

    calls = []
    real = acc_mod.Accumulator.process

    def counting(self, *a):
        calls.append(1)
        return real(self, *a)

    monkeypatch.setattr(acc_mod.Accumulator, "process", counting)
    assert run_shard(session, cfg, shard, checkpoint_every=2).status == "shard harvested"
    assert len(calls) == n_batches - 2  # resumed after the checkpoint at batch 2
    assert not (out / CHECKPOINT).exists()
    _assert_same(straight, load_harvest_shard(session, cfg, shard), exact_floats=True)
    assert (out / FIRINGS).read_bytes() == (straight.path / FIRINGS).read_bytes()


def load_harvest_shard(session, cfg, shard):
    run_id, cfg = resolve_config(session, cfg)
    path = shards_dir(run_id, config_hash(run_id, cfg)) / shard.name
    return Harvest(path, *read_result(path))


# ----------------------------------------------------------------------------------- (f)
def test_done_stage_is_reused_and_absence_is_a_clear_error(session, monkeypatch):
    with pytest.raises(HarvestNotFound, match=r"no finished harvest.*spd-mcp harvest"):
        load_harvest(session)
    assert load_harvest("tales", missing_ok=True) is None
    with pytest.raises(HarvestError, match="no finished shards"):
        merge_shards(session, HarvestConfig(n_tokens=500))

    cfg = HarvestConfig(n_tokens=500, batch_size=4)
    first = harvest(session, cfg)
    assert first.status == "harvested"
    stage = stage_dir(first.run_id, first.config_hash)
    assert sorted(p.name for p in stage.iterdir()) == [
        "DONE", "examples.safetensors", "manifest.json", "plan.json", "stats.safetensors"]

    def boom(*a, **k):
        raise AssertionError("a DONE stage must not be recomputed")

    monkeypatch.setattr(acc_mod.Accumulator, "process", boom)
    again = harvest(session, cfg)
    assert again.status == "already harvested" and "already harvested" in again.message
    assert run_shard(session, cfg, ShardSpec(index=1, count=2)).status == (
        "shard already harvested")
    h = load_harvest(session)
    assert h.config_hash == first.config_hash
    assert load_harvest("tales", first.config_hash).manifest.n_tokens == h.stats.n_tokens
    with pytest.raises(HarvestNotFound, match="available"):
        load_harvest(session, "0123456789abcdef")
    # a stage without DONE is invisible
    (stage / "DONE").unlink()
    assert load_harvest(session, missing_ok=True) is None

    ex = component_examples(h, int(h.stats.fire_count.argmax()), k=3, order="ci")
    assert len(ex) == 3 and ex[0].firing_ci >= ex[1].firing_ci >= ex[2].firing_ci
    assert all(e.token_ids[e.offset] >= 0 and 0 <= e.key < 1 for e in ex)


# ----------------------------------------------------------------------------------- CLI
def test_cli_harvest_shards_and_merge(capsys):
    assert main(["harvest", "tales", "--tokens", "600", "--shard", "2/2"]) == 2
    assert "0-based" in capsys.readouterr().err
    assert main(["harvest", "tales", "--shard", "1-2"]) == 2
    assert "i/n" in capsys.readouterr().err
    assert main(["harvest", "tales", "--tokens", "0"]) == 2
    assert "n_tokens" in capsys.readouterr().err
    assert main(["harvest", "merge", "tales", "--tokens", "600"]) == 2
    assert "no finished shards" in capsys.readouterr().err
    for i in range(2):
        assert main(["harvest", "tales", "--tokens", "600", "--shard", f"{i}/2",
                     "--threads", "1"]) == 0
    assert "harvested shard 1-of-2" in capsys.readouterr().out
    assert main(["harvest", "merge", "tales", "--tokens", "600"]) == 0
    assert "harvested:" in capsys.readouterr().out
    assert main(["harvest", "tales", "--tokens", "600"]) == 0
    assert "already harvested" in capsys.readouterr().out
    assert load_harvest("tales").stats.n_tokens >= 600


def test_shard_spec_parsing():
    assert ShardSpec.parse("1/4") == ShardSpec(index=1, count=4)
    for bad in ("4/4", "0/0", "a/b", "1", "-1/2"):
        with pytest.raises(HarvestError):
            ShardSpec.parse(bad)
