"""Node remainders: act = in_sum + pruned + dead + delta + bias + unexplained, each part checked
against finite differences of forward passes with the decomposed layers' outputs frozen and split
into alive writes, dead writes, weight-delta and bias terms."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor, nn

from spd_mcp.analysis.graph import (
    PARTS,
    REMAINDER,
    AttributionGraph,
    compute_graph,
    compute_graph_reference,
    remainders,
)
from spd_mcp.analysis.graph_view import graph_from_bytes, graph_to_bytes
from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.config import ModulePattern
from spd_mcp.model.topology import Topology
from spd_mcp.model.zoo.tms import TMSModel

PROMPT = "once upon a time there was a girl named mia . mia found a ball . the ball was"
IN_SUM, PRUNED, DEAD, DELTA, BIAS, REST = range(len(REMAINDER))


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@functools.cache
def _tales() -> tuple[ComponentModel, Topology, Tensor, dict[str, Tensor]]:
    """tales in float64, a prompt and its natural CI."""
    from spd_mcp.model.run_io import load_run

    run = load_run("tales")
    cm = run.model.double()  # a fresh load: nothing else holds it
    ids = torch.tensor(run.target.entry.tokenizer.encode(PROMPT))
    with torch.no_grad():
        _, ci = cm.ci_for(ids[None])
    topo = Topology.for_transformer(run.target.model.config)
    return cm, topo, ids, {k: v[0] for k, v in ci.lower.items()}


def _rows(g: AttributionGraph) -> Tensor:
    """Nodes with computed parts."""
    return (~remainders(g)[:, REST].isnan()).nonzero().flatten()


def _split(cm: ComponentModel, inp: Tensor, ci: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each decomposed layer's target output as (alive writes, dead writes, x Δᵀ, bias)."""
    xs: dict[str, Tensor] = {}
    hs = [
        cm.target.get_submodule(m).register_forward_hook(
            lambda _m, a, _o, m=m: xs.__setitem__(m, a[0])
        )
        for m in cm.layer_names
    ]
    with torch.no_grad():
        cm.target(inp[None])
    for h in hs:
        h.remove()
    out = {}
    for m, x in xs.items():
        comp, mod = cm.component(m), cm.target.get_submodule(m)
        a = x[0] @ comp.V
        alive = (ci[m].reshape(a.shape) > 0).to(a.dtype)
        bias = torch.zeros_like(a @ comp.U) if mod.bias is None else mod.bias.expand_as(a @ comp.U)
        delta = x[0] @ (mod.weight - comp.weight()).T
        out[m] = torch.stack([(a * alive) @ comp.U, (a * (1 - alive)) @ comp.U, delta, bias])
        torch.testing.assert_close(out[m].sum(0), mod(x)[0])  # the split is the target's output
    return out


def _direct(
    cm: ComponentModel, inp: Tensor, split: dict[str, Tensor], node: tuple[str, int, int],
    scale: Tensor, embed: str | None,
) -> float:
    """A node's value with every decomposed layer's output frozen as ``scale · split`` (the
    embedding output scaled as an alive write): the logit, or x V[:, c] at the target layer."""
    layer, pos, c = node
    seen: dict[str, Tensor] = {}

    def freeze(m: str):
        def hook(_mod: nn.Module, args: tuple, _out: Tensor) -> Tensor:
            seen[m] = args[0]
            return torch.einsum("k,k...->...", scale, split[m])[None]

        return hook

    hs = [cm.target.get_submodule(m).register_forward_hook(freeze(m)) for m in split]
    if embed is not None:
        hs.append(cm.target.get_submodule(embed).register_forward_hook(
            lambda _m, _a, out: out * scale[0]))
    try:
        with torch.no_grad():
            logits = cm.target(inp[None])
            if layer == "output":
                return float(logits.reshape(-1, logits.shape[-1])[pos, c])
            x = seen[layer].reshape(-1, seen[layer].shape[-1])
            return float(x[pos] @ cm.component(layer).V[:, c])
    finally:
        for h in hs:
            h.remove()


def _fd_parts(
    cm: ComponentModel, inp: Tensor, split: dict[str, Tensor], node: tuple[str, int, int],
    embed: str | None, eps: float = 1e-5,
) -> list[float]:
    """∂ value / ∂ (scale of alive, dead, delta, bias) at scale 1: gradient · each input part."""
    out = []
    for k in range(4):
        e = torch.zeros(4, dtype=torch.float64)
        e[k] = eps
        hi = _direct(cm, inp, split, node, 1 + e, embed)
        lo = _direct(cm, inp, split, node, 1 - e, embed)
        out.append((hi - lo) / (2 * eps))
    return out


def test_tales_parts_match_forward_passes() -> None:
    cm, topo, ids, ci = _tales()
    g = compute_graph(cm, topo, ids, ci, top_k_outputs=3)
    R = remainders(g)
    rows = _rows(g)
    outputs = [i for i, lay in enumerate(g.node_layer) if lay == "output"]
    assert set(outputs) <= set(rows.tolist()) and len(rows) == 256 + len(outputs)  # the cap
    assert all(R[i, 1:].isnan().all() for i in range(len(ids)))  # embed nodes: no parts
    # the parts sum to value − in_sum; nothing is pruned without a threshold or cap
    torch.testing.assert_close(R[rows].sum(1), g.node_act[rows], atol=1e-4, rtol=0)
    assert bool((R[rows, PRUNED] == 0).all())
    assert float(R[rows, DEAD].abs().max()) > 0.1  # tales' dead components do write
    assert float(R[rows, BIAS].abs().max()) == 0  # tales has no biases
    split = _split(cm, ids, ci)
    layer_of = {topo.to_canonical(m): m for m in cm.layer_names}
    picks = {"output": outputs}
    for lay in ("1.attn.o", "1.mlp.down", "1.mlp.up"):  # through softmax, GELU, RMSNorm
        cand = [i for i in rows.tolist() if g.node_layer[i] == lay]
        picks[lay] = [max(cand, key=lambda i: abs(float(R[i, REST])))]
    for lay, nodes in picks.items():
        for i in nodes:
            node = (layer_of.get(lay, lay), int(g.node_pos[i]), int(g.node_idx[i]))
            alive, dead, delta, bias = _fd_parts(cm, ids, split, node, "embed")
            value = _direct(cm, ids, split, node, torch.ones(4, dtype=torch.float64), "embed")
            assert value == pytest.approx(float(g.node_act[i]), abs=1e-9)
            got = R[i].tolist()
            assert got[IN_SUM] == pytest.approx(alive, abs=1e-5), g.node_keys[i]
            assert got[DEAD] == pytest.approx(dead, abs=1e-5), g.node_keys[i]
            assert got[DELTA] == pytest.approx(delta, abs=1e-5), g.node_keys[i]
            assert got[BIAS] == pytest.approx(bias, abs=1e-5), g.node_keys[i]
            rest = value - alive - dead - delta - bias
            assert got[REST] == pytest.approx(rest, abs=1e-5), g.node_keys[i]
    # the logits read the residual through RMSNorm, which is scale invariant: gradient · input
    # over the whole residual is 0, so the edges and the other parts cancel
    for i in outputs:
        assert float(R[i, REST]) == pytest.approx(float(g.node_act[i]), abs=1e-6)


def test_pruned_is_the_dropped_edges() -> None:
    cm, topo, ids, ci = _tales()
    full = compute_graph(cm, topo, ids, ci, top_k_outputs=3, remainder_nodes=10_000)
    Rf = remainders(full)
    assert len(_rows(full)) == full.n_nodes - len(ids)  # every node but the embeddings
    for kw in ({"edge_threshold": 0.05}, {"max_edges": 500}):
        cut = compute_graph(cm, topo, ids, ci, top_k_outputs=3, **kw)
        assert cut.n_edges < full.n_edges
        Rc = remainders(cut)
        rows = _rows(cut)
        assert float(Rc[rows, PRUNED].abs().max()) > 1e-3
        # kept + pruned = all alive edges; the other parts do not depend on pruning
        torch.testing.assert_close(Rc[rows, IN_SUM] + Rc[rows, PRUNED], Rf[rows, IN_SUM],
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(Rc[rows, DEAD:], Rf[rows, DEAD:], atol=1e-6, rtol=0)
        torch.testing.assert_close(Rc[rows].sum(1), cut.node_act[rows], atol=1e-4, rtol=0)
    # a cap alone: pruned is known (exactly) for every node, parts or not
    capped = compute_graph(cm, topo, ids, ci, top_k_outputs=3, max_edges=500, remainder_nodes=0)
    tgt = [i for i, lay in enumerate(capped.node_layer) if lay != "embed"]
    Rc = remainders(capped)
    assert len(_rows(capped)) == 3  # outputs only
    torch.testing.assert_close(Rc[tgt, IN_SUM] + Rc[tgt, PRUNED], Rf[tgt, IN_SUM],
                               atol=1e-6, rtol=0)


def test_toy_model_with_bias_is_explained_exactly() -> None:
    """TMS: out = relu(linear2(h)); for outputs above 0 the direct function is linear, so the
    parts explain the value (unexplained 0) and the bias part is linear2's bias."""
    torch.manual_seed(0)
    cm = ComponentModel(TMSModel(6, 3), [ModulePattern(pattern="linear*", C=8)]).double()
    topo = Topology.identity(cm.layer_names)
    x = torch.rand(6, dtype=torch.float64)
    ci = {n: (torch.rand(1, C) < 0.5).double() for n, C in cm.Cs.items()}
    g = compute_graph(cm, topo, x, ci, top_k_outputs=6)
    R = remainders(g)
    b = cm.target.linear2.bias.detach()
    split = _split(cm, x, ci)
    for i, lay in enumerate(g.node_layer):
        if lay != "output" or g.node_act[i] <= 0:
            continue
        tok = int(g.node_idx[i])
        assert float(R[i, BIAS]) == pytest.approx(float(b[tok]), abs=1e-12)
        assert float(R[i, REST]) == pytest.approx(0.0, abs=1e-10)
        fd = _fd_parts(cm, x, split, ("output", 0, tok), None)
        assert R[i, [IN_SUM, DEAD, DELTA, BIAS]].tolist() == pytest.approx(fd, abs=1e-6)
    # the reference graph knows pruned only; parts survive storage
    ref = compute_graph_reference(cm, topo, x, ci, top_k_outputs=6)
    assert ref.node_parts is not None and bool(ref.node_parts[:, 1:].isnan().all())
    back = graph_from_bytes(graph_to_bytes(g))
    assert back.node_parts is not None
    torch.testing.assert_close(back.node_parts, g.node_parts, equal_nan=True)
    assert len(PARTS) == 4


class _Session:
    """What the view reads from a RunSession."""

    def token_str(self, t: int) -> str:
        return f"t{t}"

    def tokens(self, ids: list[int]) -> list[str]:
        return [self.token_str(t) for t in ids]


def test_view_reports_in_sum_and_remainder() -> None:
    from spd_mcp.analysis.graph_view import view_graph

    cm, topo, ids, ci = _tales()
    g = graph_from_bytes(graph_to_bytes(compute_graph(cm, topo, ids, ci, top_k_outputs=3)))
    view = view_graph(_Session(), 1, g, top_k=20)  # type: ignore[arg-type]
    assert view.remainder_note and "unexplained" in view.remainder_note
    R = remainders(g)
    by_key = {k: i for i, k in enumerate(g.node_keys)}
    outs = [n for n in view.nodes if n.key.startswith("output:")]
    assert len(outs) == 3
    for n in view.nodes:
        i = by_key[n.key]
        if n.key.startswith("embed:"):
            assert n.in_sum is None and n.remainder is None
            continue
        assert n.in_sum == pytest.approx(float(R[i, IN_SUM]), abs=1e-4)
        if n.remainder is not None:
            r = n.remainder
            total = n.in_sum + r.pruned + r.dead + r.delta + r.bias + r.unexplained
            assert total == pytest.approx(n.act, abs=1e-3)
    assert all(n.remainder is not None for n in outs)
    # a graph stored before remainders: in_sum only
    g.node_parts = None
    old = view_graph(_Session(), 1, g, top_k=20)  # type: ignore[arg-type]
    assert old.remainder_note is None and all(n.remainder is None for n in old.nodes)
