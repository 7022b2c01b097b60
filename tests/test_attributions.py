"""Dataset attributions: the fast algebra equals the per-target reference, the sums tie to the
attribution graph's edges, stages are reused, queries rank and normalise, errors are clear."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from spd_mcp.analysis.graph import compute_graph
from spd_mcp.attributions import (
    AttributionConfig,
    AttributionError,
    AttributionsNotFound,
    AttributionSums,
    accumulate,
    compute_attributions,
    load_attributions,
    reference_attributions,
    strength,
    top_sources,
    top_targets,
)
from spd_mcp.attributions.compute import SUM_TENSORS
from spd_mcp.attributions.store import stage_dir
from spd_mcp.cli import main
from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.config import ModulePattern
from spd_mcp.model.run_io import RunError
from spd_mcp.model.session import RunSession
from spd_mcp.model.topology import Topology
from spd_mcp.model.zoo.transformer import Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_len=32)
ALL = ["blocks.*.attn.*", "blocks.*.mlp.*"]
PATTERNS = {  # (patterns, C)
    "attn+mlp": (ALL, 8),  # attention cut at o: the per-query closed form; rows = V's columns
    "wide-C": (ALL, 40),  # C >= d_in: rows = input dims, q/k/v share one backward
    "mlp-only": (["blocks.*.mlp.*"], 8),  # targets reach sources through attention: general
    "embed+all": (["embed", *ALL], 8),  # decomposed embedding: no input-token sources
}


def _cm(patterns: list[str], C: int = 8) -> ComponentModel:
    torch.manual_seed(0)
    return ComponentModel(Transformer(CFG), [ModulePattern(pattern=p, C=C) for p in patterns])


def _ci_fn(cm: ComponentModel):
    """Deterministic random CI in [0, 1), zero about half the time."""
    g = torch.Generator().manual_seed(3)
    proj = {n: torch.randn(cm.component(n).d_in, C, generator=g) for n, C in cm.Cs.items()}

    def ci_fn(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for n, x in inputs.items():
            z = proj[n][x] if not x.is_floating_point() else x @ proj[n]
            out[n] = torch.tanh(z).clamp(min=0)
        return out

    return ci_fn


def _batches(n: int = 2, B: int = 3, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(2, 12, (B,), generator=g)
        lengths[0] = 11  # padding in every batch
        out.append((torch.randint(0, CFG.vocab_size, (B, 11), generator=g), lengths))
    return out


def _assert_close(a: AttributionSums, b: AttributionSums, rel: float = 1e-4) -> None:
    assert a.n_tokens == b.n_tokens and a.n_docs == b.n_docs
    for k, v in a.tensors.items():
        w = b.tensors[k]
        assert v.shape == w.shape and v.dtype == w.dtype, k
        if not v.dtype.is_floating_point:
            assert torch.equal(v, w), k
            continue
        scale = float(w.abs().max()) or 1.0
        err = float((v - w).abs().max())
        assert err <= rel * scale, (k, err, scale)


@pytest.mark.parametrize("case", list(PATTERNS))
def test_fast_equals_per_component_reference(case: str) -> None:
    cm = _cm(*PATTERNS[case])
    topo = Topology.for_transformer(CFG)
    batches = _batches()
    fast = accumulate(cm, topo, batches, _ci_fn(cm), chunk=5)  # several row chunks per target
    ref = reference_attributions(cm, topo, batches, _ci_fn(cm))
    _assert_close(fast, ref)
    assert all(float(fast[k].abs().max()) > 0 for k in ("comp_comp", "comp_output"))
    if case == "embed+all":  # tokens reach components only through the decomposed embedding
        assert not fast["token_comp"].any() and not fast["token_output"].any()
    else:
        assert fast["token_comp"].abs().max() > 0
    # direct effects only flow forward: no source at or after its target's layer
    lay = torch.repeat_interleave(torch.arange(len(fast.layers)),
                                  torch.tensor(fast.offsets).diff())
    assert not fast["comp_comp"][lay[:, None] >= lay[None, :]].any()
    assert fast.n_tokens == sum(int(lengths.sum()) for _, lengths in batches)


def test_batching_and_padding_do_not_change_the_sums() -> None:
    cm = _cm(ALL)
    topo = Topology.for_transformer(CFG)
    batches = _batches(n=1, B=4)
    ids, lengths = batches[0]
    singles = [(ids[i:i + 1, : int(lengths[i])], lengths[i:i + 1]) for i in range(4)]
    a = accumulate(cm, topo, batches, _ci_fn(cm))
    b = accumulate(cm, topo, singles, _ci_fn(cm))
    for k in SUM_TENSORS:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5 * float(b[k].abs().max()))


@pytest.mark.parametrize("weighting", ["ones", "random"])
def test_sums_are_the_graph_edges_summed_over_positions(weighting: str) -> None:
    """One prompt: A[s, t] = Σ over (source pos, target pos) of the graph's edge s → t, each
    weighted by the source's CI (CI = 1: the plain edge sum); likewise tokens and outputs."""
    cm = _cm(ALL)
    topo = Topology.for_transformer(CFG)
    T = 9
    ids = torch.randint(0, CFG.vocab_size, (T,))
    ci_fn = _ci_fn(cm)
    if weighting == "ones":
        ci_fn = lambda inputs: {n: torch.ones(*x.shape[:-1], cm.Cs[n])  # noqa: E731
                                for n, x in inputs.items()}
    sums = accumulate(cm, topo, [(ids[None], torch.tensor([T]))], ci_fn)
    _, inputs, _ = cm.forward_with_inputs(ids[None])
    ci = {n: v[0] for n, v in ci_fn({n: x.detach() for n, x in inputs.items()}).items()}
    g = compute_graph(cm, topo, ids, ci, ci_threshold=-1.0, output_positions=list(range(T)),
                      top_k_outputs=CFG.vocab_size)
    offset = dict(zip(sums.layers, sums.offsets, strict=False))
    layer = g.node_layer
    S, V = sums.n_components, CFG.vocab_size
    node_global = torch.tensor([offset.get(layer[i], 0) for i in range(g.n_nodes)]) + g.node_idx
    kind = torch.tensor([0 if lay == "embed" else 2 if lay == "output" else 1 for lay in layer])
    token_at = torch.tensor([int(ids[p]) for p in g.node_pos.tolist()])
    src, tgt = g.edge_src, g.edge_tgt
    val = g.edge_val.double() * g.node_ci[src].double()  # embed nodes have ci 1
    expect = {
        "comp_comp": ((1, 1), (S, S), node_global, node_global),
        "token_comp": ((0, 1), (V, S), token_at, node_global),
        "comp_output": ((1, 2), (S, V), node_global, g.node_idx),
        "token_output": ((0, 2), (V, V), token_at, g.node_idx),
    }
    for name, ((ks, kt), shape, si, ti) in expect.items():
        sel = (kind[src] == ks) & (kind[tgt] == kt)
        dense = torch.zeros(shape, dtype=torch.float64)
        dense.index_put_((si[src[sel]], ti[tgt[sel]]), val[sel], accumulate=True)
        scale = float(dense.abs().max())
        assert scale > 0, name
        assert float((sums[name] - dense).abs().max()) <= 1e-4 * scale, name


# ------------------------------------------------------------------------- stage and queries
@pytest.fixture(scope="module")
def session() -> RunSession:
    return RunSession.load("tales")


SMALL = AttributionConfig(n_tokens=300, batch_size=4)


def test_stage_is_computed_once_and_reused(session, capsys) -> None:
    assert load_attributions(session, missing_ok=True) is None
    with pytest.raises(AttributionsNotFound, match="spd-mcp attributions"):
        load_attributions(session)
    ticks: list[tuple[int, int]] = []
    out = compute_attributions(session, SMALL, progress=lambda d, t: ticks.append((d, t)))
    assert out.status == "computed" and out.n_tokens >= 300
    assert ticks[-1][0] == ticks[-1][1] == out.n_tokens
    path = stage_dir(out.run_id, out.config_hash)
    assert sorted(p.name for p in path.iterdir()) == [
        "DONE", "attributions.safetensors", "manifest.json"]
    mtime = (path / "attributions.safetensors").stat().st_mtime_ns
    again = compute_attributions(session, SMALL)
    assert again.status == "already computed" and again.path == out.path
    assert (path / "attributions.safetensors").stat().st_mtime_ns == mtime
    attr = load_attributions("tales")
    assert attr is not None and attr.config_hash == out.config_hash
    assert attr.manifest.n_tokens == out.n_tokens == int(attr["token_count"].sum())
    assert attr.manifest.tensors["comp_comp"] == [1536, 1536]
    assert load_attributions(session, out.config_hash) is not None
    with pytest.raises(AttributionsNotFound, match="available"):
        load_attributions(session, "0123456789abcdef")
    # the CLI sees the finished stage before loading the model
    assert main(["attributions", "tales", "--tokens", "300", "--batch-size", "4"]) == 0
    assert "already computed" in capsys.readouterr().out
    # an unfinished stage (no DONE) is invisible to readers
    (path / "DONE").unlink()
    assert load_attributions(session, missing_ok=True) is None


def test_queries_rank_normalise_and_name_tokens(session) -> None:
    compute_attributions(session, SMALL)
    attr = load_attributions(session)
    assert attr is not None
    tok = session.tokenizer
    fire = attr["fire_count"]
    tgt_c = int(fire[attr.offsets[10]:attr.offsets[11]].argmax())  # a live 1.mlp.up component
    tkey = f"1.mlp.up:{tgt_c}"
    rows = top_sources(attr, tkey, k=8, tokenizer=tok)
    assert len(rows) == 8 and [r.value for r in rows] == sorted((r.value for r in rows),
                                                               reverse=True)
    mag = top_sources(attr, tkey, k=8, signed=False, tokenizer=tok)
    assert [abs(r.value) for r in mag] == sorted((abs(r.value) for r in mag), reverse=True)
    assert {r.kind for r in mag} <= {"component", "input_token"}
    for r in mag:
        assert strength(attr, r.key, tkey) == pytest.approx(r.raw)
        if r.kind == "input_token":
            assert r.token == tok.id_to_token(int(r.key.split(":")[1]))
            assert strength(attr, r.token, tkey, tokenizer=tok) == pytest.approx(r.raw)
        else:  # upstream of the target only
            assert attr.layers.index(r.key.rsplit(":", 1)[0]) < 10
    # fractions of the target's total |attribution| over all sources
    frac = top_sources(attr, tkey, k=10_000, signed=False, normalize="fraction")
    assert sum(abs(r.value) for r in frac) == pytest.approx(1.0)
    mean = top_sources(attr, tkey, k=1, normalize="mean")[0]
    assert mean.value == pytest.approx(mean.raw / attr.manifest.n_tokens)
    only = top_sources(attr, tkey, k=5, include=["input_token"], tokenizer=tok)
    assert only and all(r.kind == "input_token" for r in only)
    # targets of a token and of a component; output tokens by word
    the = top_targets(attr, "the", k=5, tokenizer=tok, include=["output_token"])
    assert the and all(r.kind == "output_token" and r.key.startswith("output:") for r in the)
    src = top_sources(attr, "output:" + str(tok.token_to_id(".")), k=3)
    comp = next(r for r in top_sources(attr, "output:.", k=50, tokenizer=tok)
                if r.kind == "component")
    outs = top_targets(attr, comp.key, k=3, normalize="fraction")
    assert src and outs and all(r.raw != 0 for r in outs)


def test_bad_keys_and_runs_are_clear_errors(session, capsys) -> None:
    compute_attributions(session, SMALL)
    attr = load_attributions(session)
    assert attr is not None
    with pytest.raises(AttributionError, match=r"out of range for 0\.attn\.q \(C=128"):
        top_sources(attr, "0.attn.q:999")
    with pytest.raises(AttributionError, match="embed tokens are only sources"):
        top_sources(attr, "embed:5")
    with pytest.raises(AttributionError, match=r"unknown key 'bogus'.*layers: 0\.attn\.q"):
        top_targets(attr, "bogus")
    with pytest.raises(AttributionError, match="not in the vocabulary"):
        top_targets(attr, "zzzqqq", tokenizer=session.tokenizer)
    with pytest.raises(AttributionError, match="normalize"):
        top_sources(attr, "1.attn.o:0", normalize="max")  # type: ignore[arg-type]
    with pytest.raises(RunError, match="not found"):
        load_attributions("no-such-run")
    assert main(["attributions", "no-such-run"]) == 2
    assert "run 'no-such-run' not found" in capsys.readouterr().err
    assert main(["attributions", "tales", "--tokens", "0"]) == 2
    assert "n_tokens" in capsys.readouterr().err


def test_a_run_without_text_is_refused(session, monkeypatch) -> None:
    monkeypatch.setattr(session, "text", None)  # a run whose target offers no text
    with pytest.raises(AttributionError, match="no text dataset"):
        compute_attributions(session, AttributionConfig(n_tokens=10))
