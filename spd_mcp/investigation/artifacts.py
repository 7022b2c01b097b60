"""Graph artifacts: a self-contained JSON snapshot of a stored graph, and its export to the
circuit-tracer / Neuronpedia graph format.

Artifact schema ``spd-mcp/graph-artifact`` v1::

    {schema, version, artifact_id, title, caption, created, run, graph_id,
     metadata: {graph_kind, params, metrics?, n_nodes_total, n_edges_total, ci_threshold,
                max_edges, n_edges_kept},
     prompt: {prompt_id, text, token_ids, tokens},
     nodes: [{key, layer, pos, index, token, act, ci, prob, output_token?, label?}],
     edges: [{src, tgt, value, value_abs}]}          # largest |value| first

Circuit-tracer export (``to_circuit_tracer``) follows circuit-tracer's frontend ``Model``
(metadata, qParams, nodes, links). Divergences: an SPD component is a rank-1 piece of one weight
matrix, not a transcoder feature; component nodes get ``feature_type`` "cross layer transcoder"
(so existing frontends draw them), ``layer`` is the transformer block index (matrix ordinal for
non-transformer runs), ``feature`` is the Cantor pairing of (matrix ordinal, component index) so it
is unique per matrix, and the SPD key is kept in ``clerp`` and an extra ``spd_key`` field.
``influence`` is null (not computed); ``activation`` is the component activation. There are no
error nodes (SPD components reconstruct the weights, not the activations).
"""

from __future__ import annotations

import math
import re
from typing import Any

from spd_mcp.keys import component_key

from .taskdir import now_iso

SCHEMA = "spd-mcp/graph-artifact"
VERSION = 1
_BLOCK = re.compile(r"^(\d+)\.")


def build_graph_artifact(
    *,
    artifact_id: str,
    title: str,
    caption: str | None,
    run: str,
    graph_id: int,
    graph_kind: str,
    params: dict[str, Any],
    summary: dict[str, Any],
    prompt_id: int | None,
    prompt_text: str | None,
    g: Any,
    token_str: Any,
    labels: dict[str, str],
    max_edges: int,
    ci_threshold: float,
) -> dict[str, Any]:
    """The artifact dict for an ``AttributionGraph`` ``g`` (``token_str``: id → text)."""
    import torch

    special = torch.tensor([lay in ("embed", "output") for lay in g.node_layer], dtype=torch.bool)
    keep_node = (g.node_ci > ci_threshold) | special
    keep = keep_node[g.edge_src] & keep_node[g.edge_tgt]
    sel = keep.nonzero().flatten()
    sel = sel[g.edge_val[sel].abs().argsort(descending=True)][:max_edges]
    src, tgt = g.edge_src[sel].tolist(), g.edge_tgt[sel].tolist()
    val, val_abs = g.edge_val[sel].tolist(), g.edge_val_abs[sel].tolist()
    outputs = [i for i, lay in enumerate(g.node_layer) if lay == "output"]
    touched = sorted(set(src) | set(tgt) | set(outputs))
    pos_all, idx_all = g.node_pos.tolist(), g.node_idx.tolist()
    nodes = []
    for i in touched:
        layer, p, idx = g.node_layer[i], int(pos_all[i]), int(idx_all[i])
        prob = float(g.output_prob[i])
        node: dict[str, Any] = {
            "key": g.node_keys[i], "layer": layer, "pos": p, "index": idx,
            "token": token_str(g.tokens[p]) if g.tokens and p >= 0 else None,
            "act": round(float(g.node_act[i]), 6), "ci": round(float(g.node_ci[i]), 6),
            "prob": None if math.isnan(prob) else round(prob, 6),
        }
        if layer == "output":
            node["output_token"] = token_str(idx)
        elif layer != "embed":
            label = labels.get(component_key(layer, idx))
            if label:
                node["label"] = label
        nodes.append(node)
    edges = [{"src": g.node_keys[s], "tgt": g.node_keys[t], "value": round(v, 7),
              "value_abs": round(a, 7)}
             for s, t, v, a in zip(src, tgt, val, val_abs, strict=True)]
    meta: dict[str, Any] = {
        "graph_kind": summary.get("kind", graph_kind), "store_kind": graph_kind, "params": params,
        "n_nodes_total": g.n_nodes, "n_edges_total": g.n_edges, "ci_threshold": ci_threshold,
        "max_edges": max_edges, "n_edges_kept": len(edges),
    }
    if "metrics" in summary:
        meta["metrics"] = summary["metrics"]
    return {
        "schema": SCHEMA, "version": VERSION, "artifact_id": artifact_id, "title": title,
        "caption": caption, "created": now_iso(), "run": run, "graph_id": graph_id,
        "metadata": meta,
        "prompt": {"prompt_id": prompt_id, "text": prompt_text, "token_ids": list(g.tokens),
                   "tokens": [token_str(t) for t in g.tokens]},
        "nodes": nodes, "edges": edges,
    }


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def to_circuit_tracer(art: dict[str, Any]) -> dict[str, Any]:
    """The circuit-tracer / Neuronpedia graph JSON of an artifact (see the module docstring)."""
    if art.get("schema") != SCHEMA:
        raise ValueError(f"not a graph artifact (schema {art.get('schema')!r}, want {SCHEMA!r})")
    comp_layers = list(dict.fromkeys(n["layer"] for n in art["nodes"]
                                     if n["layer"] not in ("embed", "output")))
    ordinal = {lay: i for i, lay in enumerate(comp_layers)}

    def block(layer: str) -> int:
        m = _BLOCK.match(layer)
        return int(m.group(1)) if m else ordinal[layer]

    n_blocks = 1 + max((block(lay) for lay in comp_layers), default=-1)
    token_ids = art["prompt"]["token_ids"]
    outputs = [n for n in art["nodes"] if n["layer"] == "output"]
    label_tok = art["metadata"].get("params", {}).get("label_token")
    target = label_tok if label_tok is not None else (
        max(outputs, key=lambda n: n["prob"] or 0.0)["index"] if outputs else None)
    ids: dict[str, str] = {}
    nodes = []
    for n in art["nodes"]:
        layer, pos, idx = n["layer"], n["pos"], n["index"]
        if layer == "embed":
            vocab = token_ids[pos] if 0 <= pos < len(token_ids) else 0
            nid = f"E_{vocab}_{pos}"
            node = {"node_id": nid, "feature": pos, "layer": "E", "ctx_idx": pos,
                    "feature_type": "embedding", "jsNodeId": f"E_{vocab}-{pos}",
                    "clerp": f"embed {n.get('token')!r}", "influence": None,
                    "activation": n["act"], "is_target_logit": False, "token_prob": 0.0}
        elif layer == "output":
            lay = str(n_blocks + 1)
            nid = f"{lay}_{idx}_{pos}"
            prob = n["prob"] or 0.0
            node = {"node_id": nid, "feature": idx, "layer": lay, "ctx_idx": pos,
                    "feature_type": "logit", "jsNodeId": f"L_{idx}-{pos}",
                    "clerp": f'Output "{n.get("output_token")}" (p={prob:.3f})',
                    "influence": None, "activation": n["act"],
                    "is_target_logit": idx == target, "token_prob": prob}
        else:
            b, feat = block(layer), _cantor(ordinal[layer], idx)
            nid = f"{b}_{feat}_{pos}"
            clerp = component_key(layer, idx) + (f" {n['label']}" if n.get("label") else "")
            node = {"node_id": nid, "feature": feat, "layer": str(b), "ctx_idx": pos,
                    "feature_type": "cross layer transcoder", "jsNodeId": f"{b}_{feat}-0",
                    "clerp": clerp, "influence": None, "activation": n["act"],
                    "is_target_logit": False, "token_prob": 0.0,
                    "spd_key": component_key(layer, idx), "ci": n["ci"]}
        node["run_idx"], node["reverse_ctx_idx"] = 0, 0
        ids[n["key"]] = nid
        nodes.append(node)
    links = [{"source": ids[e["src"]], "target": ids[e["tgt"]], "weight": e["value"]}
             for e in art["edges"] if e["src"] in ids and e["tgt"] in ids]
    slug = re.sub(r"[^a-z0-9-]+", "-", f"{art['run']}-{art['artifact_id']}".lower()).strip("-")
    return {
        "metadata": {
            "slug": slug, "scan": art["run"], "transcoder_list": [],
            "prompt_tokens": art["prompt"]["tokens"],
            "prompt": art["prompt"]["text"] or "".join(art["prompt"]["tokens"]),
            "node_threshold": art["metadata"].get("ci_threshold"), "schema_version": 1,
            "info": {"generator": "spd-mcp", "title": art["title"],
                     "caption": art.get("caption"), "graph_kind":
                     art["metadata"].get("graph_kind"), "metrics":
                     art["metadata"].get("metrics")},
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                    "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }
