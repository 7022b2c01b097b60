"""Attribution graphs: the batched ``compute_graph`` equals the per-node reference, edges are exact
direct effects (finite differences, linearity), and the output / threshold options behave."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

from spd_mcp.analysis.graph import (
    AttributionGraph,
    _leaf_forward,
    compute_graph,
    compute_graph_reference,
)
from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.config import ModulePattern
from spd_mcp.model.topology import Topology
from spd_mcp.model.zoo.tms import TMSModel
from spd_mcp.model.zoo.transformer import Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_len=32)
ALL = ["blocks.*.attn.*", "blocks.*.mlp.*"]
PATTERNS = {
    "attn+mlp": ALL,  # local + attn strategies
    "mlp-only": ["blocks.*.mlp.*"],  # general strategy (attention mixes positions)
    "embed+all": ["embed", *ALL],  # decomposed embedding: its components are the sources
    "qkv-no-o": ["blocks.*.attn.[qkv]", "blocks.*.mlp.*"],  # o undecomposed: mixed strategies
    "no-q": ["blocks.*.attn.[kvo]", "blocks.*.mlp.*"],  # o without q: general for o
}


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _transformer_cm(patterns: list[str], C: int = 16) -> ComponentModel:
    torch.manual_seed(0)
    return ComponentModel(Transformer(CFG), [ModulePattern(pattern=p, C=C) for p in patterns])


def _random_ci(cm: ComponentModel, T: int, p: float = 0.25) -> dict[str, Tensor]:
    return {n: (torch.rand(T, C) < p) * torch.rand(T, C).clamp(0.05) for n, C in cm.Cs.items()}


def _edge_dict(g: AttributionGraph, attr: str = "edge_val") -> dict[tuple[int, int], float]:
    vals = getattr(g, attr).tolist()
    return dict(zip(zip(g.edge_src.tolist(), g.edge_tgt.tolist(), strict=True), vals, strict=True))


def assert_same_graph(a: AttributionGraph, b: AttributionGraph, tol: float = 1e-5) -> None:
    """Same nodes; same edges and values (an edge on one side only must be ~0 on the other:
    exact and numerical zeros are both dropped)."""
    assert a.node_keys == b.node_keys and a.node_layer == b.node_layer
    for t in ("node_pos", "node_idx", "node_act", "node_ci"):
        torch.testing.assert_close(getattr(a, t), getattr(b, t))
    torch.testing.assert_close(a.output_prob, b.output_prob, equal_nan=True)
    for attr in ("edge_val", "edge_val_abs"):
        da, db = _edge_dict(a, attr), _edge_dict(b, attr)
        for k in da.keys() | db.keys():
            x, y = da.get(k, 0.0), db.get(k, 0.0)
            assert abs(x - y) <= tol * (1 + abs(y)), (a.node_keys[k[0]], a.node_keys[k[1]], x, y)
    assert a.n_edges > 0


def assert_canonical(g: AttributionGraph) -> None:
    key = g.edge_tgt * g.n_nodes + g.edge_src
    assert bool((key[1:] > key[:-1]).all()), "edges must be sorted by (tgt, src), unique"
    assert g.edge_src.dtype == g.edge_tgt.dtype == torch.long


@pytest.mark.parametrize("case", list(PATTERNS))
def test_fast_equals_reference_transformer(case: str) -> None:
    cm = _transformer_cm(PATTERNS[case])
    topo = Topology.for_transformer(CFG)
    T = 8
    ids = torch.randint(0, CFG.vocab_size, (T,))
    ci = _random_ci(cm, T)
    kw = {"output_positions": [3, T - 1], "top_k_outputs": 3}
    fast = compute_graph(cm, topo, ids, ci, **kw)
    ref = compute_graph_reference(cm, topo, ids, ci, **kw)
    assert_same_graph(fast, ref)
    assert_canonical(fast)
    assert_canonical(ref)
    # away from numerical zeros the edge sets are identical
    fast_t = compute_graph(cm, topo, ids, ci, edge_threshold=1e-4, **kw)
    ref_t = compute_graph_reference(cm, topo, ids, ci, edge_threshold=1e-4, **kw)
    assert torch.equal(fast_t.edge_src, ref_t.edge_src)
    assert torch.equal(fast_t.edge_tgt, ref_t.edge_tgt)
    torch.testing.assert_close(fast_t.edge_val, ref_t.edge_val, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_t.edge_val_abs, ref_t.edge_val_abs, atol=1e-5, rtol=1e-5)
    # cross-position edges exist only where attention carries them
    pos = fast.node_pos
    cross = pos[fast.edge_src] != pos[fast.edge_tgt]
    assert bool((pos[fast.edge_src] <= pos[fast.edge_tgt]).all())  # causal
    if case == "attn+mlp":
        tgt_layers = {fast.node_layer[i] for i in fast.edge_tgt[cross].tolist()}
        assert tgt_layers and tgt_layers <= {"0.attn.o", "1.attn.o"}


def test_nodes_and_outputs() -> None:
    cm = _transformer_cm(ALL)
    topo = Topology.for_transformer(CFG)
    T = 6
    ids = torch.randint(0, CFG.vocab_size, (T,))
    ci = _random_ci(cm, T)
    g = compute_graph(cm, topo, ids, ci, top_k_outputs=4, label_token=7)
    logits = cm.target(ids[None])[0].detach()
    probs = logits[-1].softmax(-1)
    top = set(probs.topk(4).indices.tolist()) | {7}
    out_keys = [k for k in g.node_keys if k.startswith("output:")]
    assert out_keys == [f"output:{T - 1}:{t}" for t in sorted(top)]
    is_out = torch.tensor([k.startswith("output:") for k in g.node_keys])
    toks = g.node_idx[is_out]
    torch.testing.assert_close(g.node_act[is_out], logits[-1, toks])  # output value = logit
    torch.testing.assert_close(g.output_prob[is_out], probs[toks])
    assert bool(g.output_prob[~is_out].isnan().all())
    assert g.node_keys[:T] == [f"embed:{p}:0" for p in range(T)]
    assert g.tokens == ids.tolist()
    # alive components = ci > threshold, keyed by canonical layer, in (layer, pos, c) order
    comp = [k for k in g.node_keys if not k.startswith(("embed", "output"))]
    expect = [
        f"{topo.to_canonical(m)}:{p}:{c}"
        for m in cm.layer_names
        for p, c in (ci[m] > 0.5).nonzero().tolist()
    ]
    g_half = compute_graph(cm, topo, ids, ci, ci_threshold=0.5, top_k_outputs=4)
    assert [k for k in g_half.node_keys if not k.startswith(("embed", "output"))] == expect
    assert len(comp) == sum(int((v > 0).sum()) for v in ci.values())
    # cumulative-probability cut keeps the smallest top prefix reaching it
    g_cum = compute_graph(cm, topo, ids, ci, top_k_outputs=10, cum_prob=0.2)
    n = int((probs.sort(descending=True).values.cumsum(0) < 0.2).sum()) + 1
    assert sum(k.startswith("output:") for k in g_cum.node_keys) == min(n, 10)


def test_leaf_forward_is_the_exact_target() -> None:
    cm = _transformer_cm(ALL)
    topo = Topology.for_transformer(CFG)
    ids = torch.randint(0, CFG.vocab_size, (9,))
    fwd = _leaf_forward(cm, topo, ids)
    with torch.no_grad():
        target = cm.target(ids[None])[0]
    torch.testing.assert_close(fwd.logits.detach(), target, atol=1e-5, rtol=0)
    assert fwd.embed_leaf is not None and fwd.embed_leaf.is_leaf
    for rec in fwd.recs.values():  # component activations are leaves equal to x V
        assert rec.leaf.is_leaf and rec.leaf.requires_grad


def _direct_effect_fd(
    cm: ComponentModel,
    ids: Tensor,
    src: tuple[str, int, Tensor],
    tgt: tuple[str, int, int],
    eps: float = 1e-3,
) -> float:
    """Finite-difference direct effect (float64): every decomposed layer's output is frozen at
    its target value except the source's, which moves by ±eps · direction at one position; the
    target's value is read from its layer input (x V[:, c]) or the logits."""
    src_mod, src_pos, direction = src
    tgt_mod, tgt_pos, tgt_c = tgt
    target = cm.target
    with torch.no_grad():
        frozen: dict[str, Tensor] = {}
        handles = [
            target.get_submodule(m).register_forward_hook(
                lambda _m, _a, out, m=m: frozen.__setitem__(m, out)
            )
            for m in {*cm.layer_names, src_mod}
        ]
        target(ids[None])
        for h in handles:
            h.remove()

    def value(sign: float) -> float:
        seen: dict[str, Tensor] = {}

        def freeze(m: str):
            def hook(_mod: nn.Module, args: tuple, _out: Tensor) -> Tensor:
                seen[m] = args[0]
                out = frozen[m].clone()
                if m == src_mod:
                    out[0, src_pos] += sign * eps * direction
                return out

            return hook

        hs = [target.get_submodule(m).register_forward_hook(freeze(m)) for m in frozen]
        try:
            logits = target(ids[None])
        finally:
            for h in hs:
                h.remove()
        if tgt_mod == "output":
            return float(logits[0, tgt_pos, tgt_c])
        return float(seen[tgt_mod][0, tgt_pos] @ cm.component(tgt_mod).V[:, tgt_c])

    with torch.no_grad():
        return (value(1.0) - value(-1.0)) / (2 * eps)


def test_edges_are_direct_effects_by_finite_differences() -> None:
    cm = _transformer_cm(ALL).double()
    topo = Topology.for_transformer(CFG)
    T = 7
    ids = torch.randint(0, CFG.vocab_size, (T,))
    ci = {n: torch.ones(T, C, dtype=torch.float64) for n, C in cm.Cs.items()}
    g = compute_graph(cm, topo, ids, ci, top_k_outputs=2)
    index = {k: i for i, k in enumerate(g.node_keys)}
    vals = _edge_dict(g)
    acts = dict(zip(g.node_keys, g.node_act.tolist(), strict=True))
    emb = cm.target.embed(ids).detach()
    top = g.node_idx[-1].item()
    checks = [  # (source layer module, canonical, pos, c) -> (target module, canonical, pos, c)
        (("blocks.1.attn.k", "1.attn.k", 2, 3), ("blocks.1.attn.o", "1.attn.o", 5, 4)),
        (("blocks.1.attn.v", "1.attn.v", 1, 0), ("blocks.1.attn.o", "1.attn.o", 6, 2)),
        (("blocks.0.attn.q", "0.attn.q", 4, 5), ("blocks.0.attn.o", "0.attn.o", 4, 1)),
        (("blocks.0.mlp.up", "0.mlp.up", 3, 7), ("blocks.0.mlp.down", "0.mlp.down", 3, 2)),
        (("blocks.0.attn.o", "0.attn.o", 2, 9), ("blocks.1.attn.q", "1.attn.q", 2, 6)),
        (("embed", "embed", 6, 0), ("blocks.1.mlp.up", "1.mlp.up", 6, 11)),
        (("blocks.1.mlp.down", "1.mlp.down", T - 1, 8), ("output", "output", T - 1, top)),
    ]
    for (s_mod, s_name, sp, sc), (t_mod, t_name, tp, tc) in checks:
        if s_mod == "embed":
            direction, act = emb[sp], 1.0  # the edge is grad · embedding vector
        else:
            direction, act = cm.component(s_mod).U[sc].detach(), acts[f"{s_name}:{sp}:{sc}"]
        fd = _direct_effect_fd(cm, ids, (s_mod, sp, direction), (t_mod, tp, tc)) * act
        edge = vals.get((index[f"{s_name}:{sp}:{sc}"], index[f"{t_name}:{tp}:{tc}"]), 0.0)
        assert abs(fd) > 1e-6, (s_name, t_name)
        assert edge == pytest.approx(fd, rel=1e-4, abs=1e-8), (s_name, t_name)


def test_toy_model_edges_are_complete_for_linear_maps() -> None:
    torch.manual_seed(0)
    tms = TMSModel(5, 3)
    cm = ComponentModel(tms, [ModulePattern(pattern="linear*", C=6)])
    topo = Topology.identity(cm.layer_names)
    x = torch.rand(5)
    ci = {n: torch.ones(1, C) for n, C in cm.Cs.items()}  # all alive
    fast = compute_graph(cm, topo, x, ci, top_k_outputs=2)
    ref = compute_graph_reference(cm, topo, x, ci, top_k_outputs=2)
    assert_same_graph(fast, ref)
    assert fast.tokens == [] and fast.node_keys[0] == "embed:0:0"
    vals, index = _edge_dict(fast), {k: i for i, k in enumerate(fast.node_keys)}
    act = dict(zip(fast.node_keys, fast.node_act.tolist(), strict=True))
    V2 = cm.component("linear2").V.detach()
    with torch.no_grad():
        delta1 = x @ cm.weight_delta("linear1").T  # linear1's weight-delta write
    for c in range(6):
        # a1 = x V1 is linear in the input: its single edge is the whole activation
        e = vals.get((index["embed:0:0"], index[f"linear1:0:{c}"]), 0.0)
        assert e == pytest.approx(act[f"linear1:0:{c}"], rel=1e-5, abs=1e-6)
        # a2 = (a1 U1 + x Δ1ᵀ) V2: edges from linear1 plus the delta term give the activation
        total = sum(
            vals.get((index[f"linear1:0:{s}"], index[f"linear2:0:{c}"]), 0.0) for s in range(6)
        )
        expect = act[f"linear2:0:{c}"] - float(delta1 @ V2[:, c])
        assert total == pytest.approx(expect, rel=1e-5, abs=1e-6)


def test_thresholds_and_max_edges_keep_the_largest() -> None:
    cm = _transformer_cm(ALL)
    topo = Topology.for_transformer(CFG)
    T = 6
    ids = torch.randint(0, CFG.vocab_size, (T,))
    ci = _random_ci(cm, T)
    full = compute_graph(cm, topo, ids, ci)
    mag = full.edge_val.abs()
    thr = float(mag.median())
    cut = compute_graph(cm, topo, ids, ci, edge_threshold=thr)
    keep = mag >= thr
    assert torch.equal(cut.edge_src, full.edge_src[keep])
    assert torch.equal(cut.edge_tgt, full.edge_tgt[keep])
    k = 50
    top = compute_graph(cm, topo, ids, ci, max_edges=k)
    assert top.n_edges == k
    assert_canonical(top)
    kept = _edge_dict(top)
    dropped = [abs(v) for e, v in _edge_dict(full).items() if e not in kept]
    assert min(abs(v) for v in kept.values()) >= max(dropped)
    assert all(_edge_dict(full)[e] == v for e, v in kept.items())
    # abs-target edges: sign of the target's value times the signed edge
    torch.testing.assert_close(
        full.edge_val_abs, full.edge_val * full.node_act[full.edge_tgt].sign()
    )


def test_progress_reports_every_target() -> None:
    cm = _transformer_cm(ALL)
    topo = Topology.for_transformer(CFG)
    ids = torch.randint(0, CFG.vocab_size, (5,))
    calls: list[tuple[int, int]] = []
    g = compute_graph(cm, topo, ids, _random_ci(cm, 5), progress=lambda d, t: calls.append((d, t)))
    n_targets = sum(not k.startswith("embed") for k in g.node_keys)
    assert calls and calls[-1] == (n_targets, n_targets)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(calls))


def test_bad_inputs_are_errors() -> None:
    cm = _transformer_cm(ALL)
    topo = Topology.for_transformer(CFG)
    ids = torch.randint(0, CFG.vocab_size, (4,))
    ci = _random_ci(cm, 4)
    with pytest.raises(ValueError, match="CI missing"):
        compute_graph(cm, topo, ids, {k: v for k, v in list(ci.items())[1:]})
    with pytest.raises(ValueError, match="out of range"):
        compute_graph(cm, topo, ids, ci, output_positions=[9])
    with pytest.raises(ValueError, match="label_token"):
        compute_graph(cm, topo, ids, ci, label_token=CFG.vocab_size)
    # canonical CI keys are accepted too
    canon = {topo.to_canonical(k): v for k, v in ci.items()}
    assert (
        compute_graph(cm, topo, ids, canon).node_keys == compute_graph(cm, topo, ids, ci).node_keys
    )


def test_tales_fast_equals_reference() -> None:
    from spd_mcp.model.run_io import load_run

    run = load_run("tales")
    cm = run.model
    ids = torch.tensor(run.target.entry.tokenizer.encode("once upon a time there was a girl named"))
    with torch.no_grad():
        _, ci = cm.ci_for(ids[None])
    ci_t = {k: v[0] for k, v in ci.lower.items()}
    topo = Topology.for_transformer(run.target.model.config)
    fast = compute_graph(cm, topo, ids, ci_t, top_k_outputs=3)
    ref = compute_graph_reference(cm, topo, ids, ci_t, top_k_outputs=3)
    assert_same_graph(fast, ref)
    assert_canonical(fast)
    assert fast.n_nodes > 100 and fast.n_edges > 1000


def test_sparse_ci_with_empty_layers_and_no_grad_caller() -> None:
    cm = _transformer_cm(ALL)
    topo = Topology.for_transformer(CFG)
    T = 7
    ids = torch.randint(0, CFG.vocab_size, (T,))
    ci = _random_ci(cm, T, p=0.04)
    ci["blocks.1.attn.k"] = torch.zeros(T, 16)  # a layer with no alive component
    ci["blocks.0.attn.o"] = torch.zeros(T, 16)
    with torch.no_grad():  # callers may hold no_grad; the graph needs autograd internally
        fast = compute_graph(cm, topo, ids, ci)
        ref = compute_graph_reference(cm, topo, ids, ci)
    assert not any(k.startswith(("1.attn.k", "0.attn.o")) for k in fast.node_keys)
    assert_same_graph(fast, ref)
