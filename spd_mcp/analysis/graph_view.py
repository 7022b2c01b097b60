"""Storing attribution graphs compactly and reading bounded, filtered views of them."""

from __future__ import annotations

import json
import math
from typing import Literal

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from spd_mcp.errors import AnalysisError
from spd_mcp.keys import EMBED, OUTPUT, is_special_layer
from spd_mcp.model.session import RunSession

from .graph import REMAINDER_NOTE, AttributionGraph, remainders

EdgeKind = Literal["signed", "abs"]
_TENSORS = ("node_pos", "node_idx", "node_act", "node_ci", "output_prob", "edge_src", "edge_tgt",
            "edge_val", "edge_val_abs")


def graph_to_bytes(g: AttributionGraph) -> bytes:
    tensors = {k: getattr(g, k).detach().cpu().contiguous() for k in _TENSORS}
    if g.node_parts is not None:
        tensors["node_parts"] = g.node_parts.detach().cpu().contiguous()
    meta = {"tokens": json.dumps(g.tokens), "node_keys": json.dumps(g.node_keys),
            "node_layer": json.dumps(g.node_layer)}
    return st_save(tensors, metadata=meta)


def graph_from_bytes(blob: bytes) -> AttributionGraph:
    tensors = st_load(blob)
    header_len = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8 : 8 + header_len])["__metadata__"]
    return AttributionGraph(
        tokens=json.loads(meta["tokens"]), node_keys=json.loads(meta["node_keys"]),
        node_layer=json.loads(meta["node_layer"]), **{k: tensors[k] for k in _TENSORS},
        node_parts=tensors.get("node_parts"),  # absent in graphs stored before remainders
    )


class Remainder(BaseModel):
    """act − in_sum, split: parts computed exactly (gradient · input) and the rest."""

    pruned: float = Field(description="incoming edges dropped by the edge threshold / cap")
    dead: float = Field(description="components with CI ≤ the threshold (not graph nodes)")
    delta: float = Field(description="weight-delta term (target weight − components)")
    bias: float = Field(description="biases of decomposed layers")
    unexplained: float = Field(description="nonlinearity (norm, softmax, GELU), other constants")


class GraphNode(BaseModel):
    key: str
    token: str | None = Field(None, description="input token at the node's position")
    act: float = Field(description="the node's value: component activation, logit (output) or "
                       "embedding norm")
    ci: float
    prob: float | None = Field(None, description="target probability (output nodes)")
    output_token: str | None = None
    in_sum: float | None = Field(None, description="sum of the node's incoming edges")
    remainder: Remainder | None = Field(
        None, description="act − in_sum split (output and most-connected nodes); see note")


class GraphEdge(BaseModel):
    src: str
    tgt: str
    value: float


class GraphView(BaseModel):
    graph_id: int
    tokens: list[str]
    edge_kind: EdgeKind
    ci_threshold: float
    n_nodes_total: int
    n_edges_total: int
    n_edges_matching: int = Field(description="edges passing the filters before top-k / paging")
    nodes: list[GraphNode] = Field(description="nodes touched by the returned edges, plus outputs")
    edges: list[GraphEdge] = Field(description="largest |value| first")
    next_offset: int | None = Field(None, description="pass as offset for the next page of edges")
    notice: str | None = None
    remainder_note: str | None = Field(None, description="why act ≠ in_sum (node remainders)")


def summarize_nodes(session: RunSession, g: AttributionGraph, idx: list[int]) -> list[GraphNode]:
    out = []
    pos = g.node_pos.tolist()
    rem = remainders(g)[idx].tolist() if idx else []
    for i, r in zip(idx, rem, strict=True):
        key = g.node_keys[i]
        layer = g.node_layer[i]
        p = pos[i]
        prob = float(g.output_prob[i])
        node = GraphNode(
            key=key,
            token=session.token_str(g.tokens[p]) if g.tokens and p >= 0 else None,
            act=round(float(g.node_act[i]), 5), ci=round(float(g.node_ci[i]), 4),
            prob=None if math.isnan(prob) else round(prob, 5),
        )
        if layer == OUTPUT:
            node.output_token = session.token_str(int(g.node_idx[i]))
        if layer != EMBED:
            node.in_sum = round(r[0], 4)
        if not math.isnan(r[-1]):
            node.remainder = Remainder(**{k: round(x, 4) for k, x in zip(
                Remainder.model_fields, r[1:], strict=True)})
        out.append(node)
    return out


def view_graph(
    session: RunSession,
    graph_id: int,
    g: AttributionGraph,
    *,
    edge_kind: EdgeKind = "signed",
    ci_threshold: float = 0.0,
    node: str | None = None,
    top_k: int = 50,
    offset: int = 0,
) -> GraphView:
    """Filter edges (node CI, neighbourhood of one node), order by |value|, page them."""
    vals = g.edge_val if edge_kind == "signed" else g.edge_val_abs
    keep_node = (g.node_ci > ci_threshold) | torch.tensor(
        [is_special_layer(lay) for lay in g.node_layer], dtype=torch.bool
    )
    keep = keep_node[g.edge_src] & keep_node[g.edge_tgt]
    if node is not None:
        try:
            i = g.node_keys.index(node)
        except ValueError:
            raise AnalysisError(
                f"node {node!r} is not in graph {graph_id} ({g.n_nodes} nodes; e.g. "
                f"{', '.join(g.node_keys[:3])}); list nodes with get_graph and no node filter"
            ) from None
        keep &= (g.edge_src == i) | (g.edge_tgt == i)
    sel = keep.nonzero().flatten()
    order = vals[sel].abs().argsort(descending=True)
    sel = sel[order]
    page = sel[offset : offset + top_k]
    src, tgt, v = g.edge_src[page].tolist(), g.edge_tgt[page].tolist(), vals[page].tolist()
    outputs = [i for i, lay in enumerate(g.node_layer) if lay == OUTPUT]
    touched = sorted(set(src) | set(tgt) | set(outputs))
    n_match = int(sel.numel())
    nxt = offset + top_k if offset + top_k < n_match else None
    notice = None
    if nxt is not None:
        notice = (f"showing edges {offset}..{offset + len(page) - 1} of {n_match} matching; "
                  f"call get_graph with offset={nxt} for more, or filter by node / ci_threshold")
    nodes = summarize_nodes(session, g, touched)
    return GraphView(
        graph_id=graph_id, tokens=session.tokens(g.tokens) if g.tokens else [],
        edge_kind=edge_kind, ci_threshold=ci_threshold, n_nodes_total=g.n_nodes,
        n_edges_total=g.n_edges, n_edges_matching=n_match, nodes=nodes,
        edges=[GraphEdge(src=g.node_keys[s], tgt=g.node_keys[t], value=round(x, 6))
               for s, t, x in zip(src, tgt, v, strict=True)],
        next_offset=nxt, notice=notice,
        remainder_note=REMAINDER_NOTE if any(n.remainder for n in nodes) else None,
    )
