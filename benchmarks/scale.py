"""Seed-size scale benchmark: every analysis stage on synthetic runs up to the size of a real SPD
decomposition, with wall time, peak RSS and (with CUDA) peak GPU memory per stage, and growth
exponents in components and in tokens. Prints one JSON object.

Runs are built here, untrained: a Goodfire ``LlamaSimpleMLP`` target (RMSNorm, RoPE, grouped-
query attention, GELU MLP ``c_fc`` / ``down_proj``, tied embeddings: the architecture of Goodfire's
SimpleStories decompositions) with random weights, random SPD components on every attention and
MLP matrix, and random ``shared_mlp`` CI functions whose output biases are calibrated so that a
``--density`` fraction of (token, component) pairs has CI > 0 (real runs: ~1%; an uncalibrated
random CI function would make half of all components alive everywhere). The tokenizer is
word-level over ``w0 .. w{V-5}`` (``tales``' tokenizer class with a synthetic vocabulary), and
the dataset is documents of Zipf-distributed random words. The run is written with ``save_run``
into a temporary ``$SPD_MCP_HOME/runs/<size>`` and loaded by name like any run (``RunSession``).

Sizes (4 layers, context 512 unless said; C per q/k/v/o and per c_fc/down_proj):

    tiny    2 layers, d 32,  d_mlp 128,  V 256,  context 64, C 32 / 64       (512 components)
    small   d 64,  d_mlp 256,  V 1024, C 128 / 384                           (5,120)
    medium  d 256, d_mlp 1024, V 4096, C 512 / 1536                          (20,480)
    seed    d 512, d_mlp 2048, V 8192, C 1024 / 3072                         (40,960)

Each stage runs in a fresh subprocess (so VmHWM, the peak RSS, is the stage's own; it includes
the loaded run). Stages:

    load          RunSession.load, then natural CI of one full-context prompt (timed apart)
    graph         compute_graph (natural CI, the service's settings) at 64 / 128 / 512 tokens;
                  the largest graph is stored for the next two stages
    get_graph     view_graph pages (top 50 edges, the next page, a node's neighbourhood)
    viewer        the viewer's graph JSON (the artifact the page renders, 2,000 edges) of the
                  largest graph, serialised
    optimize      optimize_ci, ``--opt-steps`` steps on a ``--opt-tokens`` prompt, then the graph
                  of the optimised CI
    intervene     run_intervention, every regime, on the alive nodes of the last positions
    harvest       harvest() of ``--harvest-tokens`` tokens (defaults otherwise): tokens/s, peak RSS;
                  the pass over the data and the merge (co-firing table) also timed apart
    attributions  compute_attributions of ``--attr-tokens`` tokens
    label         autointerp start-up: load the harvest, choose components, stage config and
                  the first ``--label-prompts`` prompts (no network)

Exponents: the least-squares slope of log(time) and log(peak RSS) on log(components) over the
sizes (the whole model grows with them: d_model, vocabulary and components together), and of
compute_graph's time and edge count on log(tokens). Knobs that make a stage lighter than the
real thing are recorded under ``knobs`` in the JSON (``--harvest-tokens`` and ``--attr-tokens``
above all). stdout is one JSON object (also written to ``--out``); ``--markdown`` prints a
table on stderr. A stage that fails is recorded with its error and the run goes on.

    python benchmarks/scale.py [--sizes small,medium,seed] [--stages all] [--threads 2]
                               [--out FILE] [--markdown] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "d": 32, "d_mlp": 128, "n_head": 2, "n_kv": 1, "vocab": 256,
             "ctx": 64, "c_attn": 32, "c_mlp": 64},
    "small": {"n_layer": 4, "d": 64, "d_mlp": 256, "n_head": 2, "n_kv": 1, "vocab": 1024,
              "ctx": 512, "c_attn": 128, "c_mlp": 384},
    "medium": {"n_layer": 4, "d": 256, "d_mlp": 1024, "n_head": 4, "n_kv": 2, "vocab": 4096,
               "ctx": 512, "c_attn": 512, "c_mlp": 1536},
    "seed": {"n_layer": 4, "d": 512, "d_mlp": 2048, "n_head": 8, "n_kv": 4, "vocab": 8192,
             "ctx": 512, "c_attn": 1024, "c_mlp": 3072},
}
STAGES = ("load", "graph", "get_graph", "viewer", "optimize", "intervene", "harvest",
          "attributions", "label")
NEEDS = {"get_graph": "graph", "viewer": "graph", "label": "harvest"}
GRAPH_TOKENS = (64, 128, 512)
N_DOCS = 400
WORDS_PER_DOC = 600
SHORT_DOCS = 4
GRAPH_FILE = "largest_graph.safetensors"
MAX_STORED_EDGES = 200_000  # spd_mcp.service.graphs.MAX_STORED_EDGES (what the service keeps)
VIEW_EDGES = 2_000  # the viewer's default max_edges


def n_components(size: dict[str, int]) -> int:
    return size["n_layer"] * (4 * size["c_attn"] + 2 * size["c_mlp"])


# ------------------------------------------------------------------------------------- memory
def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _gpu_peak_mb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


# --------------------------------------------------------------------------------- build a run
def _words(V: int) -> list[str]:
    return [f"w{i}" for i in range(V - 4)]  # ids 0-3 are <pad> <bos> <eos> <unk>


def _write_text(path: Path, V: int, seed: int) -> None:
    """N_DOCS documents of Zipf-distributed random words (one per line), of 16 to
    WORDS_PER_DOC words (most longer than the context); the first SHORT_DOCS of 63."""
    import torch

    words = _words(V)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 2 * WORDS_PER_DOC, (N_DOCS,), generator=g).clamp(max=WORDS_PER_DOC)
    lengths[:SHORT_DOCS] = 63  # 64 tokens with BOS: small samples read whole documents
    p = 1.0 / torch.arange(1, len(words) + 1, dtype=torch.float64)  # Zipf(1)
    ids = torch.multinomial(p, N_DOCS * WORDS_PER_DOC, replacement=True, generator=g)
    perm = torch.randperm(len(words), generator=g)  # rank → word: rare words spread over ids
    lines = [" ".join(words[i] for i in perm[row[:n]].tolist())
             for row, n in zip(ids.view(N_DOCS, WORDS_PER_DOC), lengths.tolist(), strict=True)]
    path.write_text("\n".join(lines) + "\n")


def _calibrate_ci(cm: Any, ids: Any, density: float, seed: int) -> None:
    """Scale and shift each layer's CI-function output so that about ``density`` of (token,
    component) pairs get CI > 0, with per-component spread (some dense, most rare)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _, inputs, acts = cm.forward_with_inputs(ids, acts=True)
        pre = cm.ci_fns(inputs, acts)
        for m, z in pre.items():
            z = z.reshape(-1, z.shape[-1])  # (N, C)
            last = cm.ci_fns.fns[m.replace(".", "__")].layers[-1]
            scale = 0.5 / z.std(0).clamp(min=1e-6)  # (C,) per-component std 0.5
            zc = (z - z.mean(0)) * scale
            spread = torch.randn(z.shape[1], generator=g) * 0.35  # (C,) component offsets
            cut = torch.quantile(zc.flatten()[:1_000_000], 1 - density)
            last.weight.mul_(scale[:, None])
            last.bias.copy_((last.bias - z.mean(0)) * scale - cut + spread * zc.std())


def build_run(name: str, size: dict[str, int], density: float, root: Path) -> dict[str, Any]:
    import torch

    from spd_mcp.model.component_model import ComponentModel
    from spd_mcp.model.config import DecomposeConfig
    from spd_mcp.model.run_io import save_run
    from spd_mcp.model.targets import resolve_goodfire
    from spd_mcp.model.zoo.tales.tokenizer import Tokenizer
    from spd_mcp.paths import runs_dir

    t0 = time.perf_counter()
    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    tok_dir, text = root / f"{name}-tokenizer", root / f"{name}-text.txt"
    Tokenizer(_words(size["vocab"])).to_hf().save_pretrained(str(tok_dir))
    _write_text(text, size["vocab"], seed=1)
    arch = {"n_layer": size["n_layer"], "n_head": size["n_head"], "n_embd": size["d"],
            "n_intermediate": size["d_mlp"], "n_key_value_heads": size["n_kv"],
            "vocab_size": size["vocab"], "n_ctx": size["ctx"], "block_size": size["ctx"]}
    config = DecomposeConfig.model_validate({
        "name": name, "target": {"goodfire": "LlamaSimpleMLP", "config": arch},
        "data": {"text": str(text), "context": size["ctx"]},
        "modules": [{"pattern": "h.*.attn.*", "C": size["c_attn"]},
                    {"pattern": "h.*.mlp.*", "C": size["c_mlp"]}],
        "ci_fn": {"type": "shared_mlp", "hidden": [max(64, size["d"] // 2)]},
        "sampling": "binomial", "losses": [{"type": "faithfulness", "coeff": 1.0}],
        "steps": 0, "batch_size": 1, "lr": 1e-3, "alive_threshold": 0.1,
    })
    target = resolve_goodfire(config.target, config.data, tokenizer=tok_dir)
    cm = ComponentModel(target.model, config.modules, config.ci_fn, target.aliases())
    assert target.text is not None and target.text.tokenizer.vocab_size == size["vocab"]
    sample = target.sampler(4, "cpu")  # (4, ctx) windows of the text
    _calibrate_ci(cm, sample, density, seed=2)
    entry = target.entry
    save_run(runs_dir() / name, config=config, cm=cm, metrics=[],
             summary={"synthetic": True, "density": density},
             extras=entry.save_extras if entry is not None else None)
    return {"seconds": round(time.perf_counter() - t0, 2), "components": sum(cm.Cs.values()),
            "target_parameters": sum(p.numel() for p in target.model.parameters()),
            "component_parameters": sum(p.numel() for p in cm.components.parameters()),
            "ci_fn_parameters": sum(p.numel() for p in cm.ci_fns.parameters())}


# ------------------------------------------------------------------------------------- stages
def _prompt(session: Any, n: int) -> list[int]:
    """A prompt of ``n`` tokens (BOS + words of a held-out document)."""
    text, words, i = session.require_lm(), [], 0
    while len(words) < n - 1:
        words += text.heldout_text(i).split()
        i += 1
    return session.encode(" ".join(words[: n - 1]))


def _graph_tokens(session: Any) -> list[int]:
    """64 / 128 / 512 tokens (a shorter context: 1/8, 1/4 and all of it)."""
    ctx = session.max_len
    return list(GRAPH_TOKENS) if ctx >= max(GRAPH_TOKENS) else [ctx // 8, ctx // 4, ctx]


def _natural_graph(session: Any, ids: list[int]) -> Any:
    from spd_mcp.analysis.graph import compute_graph

    nat = session.natural_ci(ids)
    return compute_graph(session.cm, session.topology, ids, session.to_module_dict(nat.ci),
                         output_positions=[len(ids) - 1], top_k_outputs=5,
                         max_edges=MAX_STORED_EDGES)


def _timed(fn: Any) -> tuple[Any, float]:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def stage_load(name: str, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    from spd_mcp.model.session import RunSession

    session, t_load = _timed(lambda: RunSession.load(name, device=a.device))
    rss_load = _status_mb("VmHWM")
    ids = _prompt(session, session.max_len)
    nat, t_ci = _timed(lambda: session.natural_ci(ids))
    alive = sum(int((c > 0).sum()) for c in nat.ci.values())
    return {"seconds": round(t_load, 3), "load_seconds": round(t_load, 3),
            "natural_ci_seconds": round(t_ci, 3), "natural_ci_tokens": len(ids),
            "peak_rss_after_load_mb": round(rss_load, 1),
            "alive_per_token": round(alive / len(ids), 1)}


def stage_graph(name: str, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    from spd_mcp.analysis.graph_view import graph_to_bytes
    from spd_mcp.model.session import RunSession

    session = RunSession.load(name, device=a.device)
    _natural_graph(session, _prompt(session, 8))  # warm-up
    out: dict[str, Any] = {"by_tokens": {}}
    g = None
    for T in _graph_tokens(session):
        ids = _prompt(session, T)
        g, t = _timed(lambda ids=ids: _natural_graph(session, ids))
        out["by_tokens"][str(T)] = {"seconds": round(t, 3), "nodes": g.n_nodes,
                                    "edges": g.n_edges, "peak_rss_mb": round(_status_mb("VmHWM"),
                                                                             1)}
    assert g is not None
    blob = graph_to_bytes(g)
    (work / GRAPH_FILE).write_bytes(blob)
    out["seconds"] = sum(r["seconds"] for r in out["by_tokens"].values())
    out["largest_graph_mb"] = round(len(blob) / 2**20, 2)
    return out


def _load_graph(work: Path) -> Any:
    from spd_mcp.analysis.graph_view import graph_from_bytes

    return graph_from_bytes((work / GRAPH_FILE).read_bytes())


def stage_get_graph(name: str, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    from spd_mcp.analysis.graph_view import view_graph
    from spd_mcp.model.session import RunSession

    session = RunSession.load(name, device=a.device)
    g, t_read = _timed(lambda: _load_graph(work))
    first, t1 = _timed(lambda: view_graph(session, 1, g, top_k=50))
    second, t2 = _timed(lambda: view_graph(session, 1, g, top_k=50, offset=50))
    node = first.edges[0].tgt if first.edges else None
    hood, t3 = _timed(lambda: view_graph(session, 1, g, node=node, top_k=50))
    return {"seconds": round(t_read + t1, 3), "read_graph_seconds": round(t_read, 3),
            "first_page_seconds": round(t1, 3), "next_page_seconds": round(t2, 3),
            "node_page_seconds": round(t3, 3), "edges_total": g.n_edges,
            "page_json_kb": round(len(first.model_dump_json()) / 1024, 1),
            "second_page_edges": len(second.edges), "node_page_edges": len(hood.edges)}


def stage_viewer(name: str, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    from spd_mcp.investigation.artifacts import build_graph_artifact
    from spd_mcp.model.session import RunSession

    session = RunSession.load(name, device=a.device)

    def render() -> str:
        g = _load_graph(work)
        art = build_graph_artifact(
            artifact_id="view-1", title="graph 1", caption=None, run=name, graph_id=1,
            graph_kind="graph", params={}, summary={"n_nodes": g.n_nodes, "n_edges": g.n_edges},
            prompt_id=None, prompt_text=None, g=g, token_str=session.token_str, labels={},
            max_edges=VIEW_EDGES, ci_threshold=0.0)
        art["layers"] = ["embed", *session.layers, "output"]
        return json.dumps(art)

    body, t = _timed(render)
    return {"seconds": round(t, 3), "max_edges": VIEW_EDGES,
            "response_kb": round(len(body) / 1024, 1)}


def stage_optimize(name: str, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    from spd_mcp.analysis.graph import compute_graph
    from spd_mcp.analysis.optimize import OptimizeSettings, circuit_nodes, optimize_ci
    from spd_mcp.model.session import RunSession

    session = RunSession.load(name, device=a.device)
    ids = _prompt(session, min(a.opt_tokens, session.max_len))
    label = int(session.natural_ci(ids).logits[-1].argmax())
    settings = OptimizeSettings(steps=a.opt_steps)
    opt, t_opt = _timed(lambda: optimize_ci(session, ids, label_token=label, settings=settings))
    g, t_graph = _timed(lambda: compute_graph(
        session.cm, session.topology, ids, session.to_module_dict(opt.ci), ci_threshold=0.0,
        output_positions=[len(ids) - 1], label_token=label, max_edges=MAX_STORED_EDGES))
    return {"seconds": round(t_opt + t_graph, 3), "optimize_seconds": round(t_opt, 3),
            "seconds_per_step": round(t_opt / a.opt_steps, 4),
            "graph_seconds": round(t_graph, 3), "steps": a.opt_steps, "tokens": len(ids),
            "circuit_nodes": len(circuit_nodes(opt)), "edges": g.n_edges}


def stage_intervene(name: str, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from spd_mcp.analysis.intervene import REGIMES, run_intervention
    from spd_mcp.keys import NodeKey
    from spd_mcp.model.session import RunSession

    session = RunSession.load(name, device=a.device)
    ids = _prompt(session, min(a.intervene_tokens, session.max_len))
    nat = session.natural_ci(ids)
    label = int(nat.logits[-1].argmax())
    T = len(ids)
    nodes = [NodeKey(layer, int(p), int(c)) for layer, ci in nat.ci.items()
             for p, c in torch.nonzero(ci[max(0, T - 4):] > 0).tolist()
             for p in [p + max(0, T - 4)]]
    r, t = _timed(lambda: run_intervention(session, ids, nodes, regimes=REGIMES, loss="label",
                                           label_token=label))
    return {"seconds": round(t, 3), "tokens": T, "nodes": len(nodes),
            "regimes": list(REGIMES), "label_prob": r.label_prob}


def _forget(session: Any, stage: str) -> None:
    """Remove a derived stage left by an earlier benchmark (it would be reused, not timed)."""
    from spd_mcp.paths import run_data_dir

    shutil.rmtree(run_data_dir(session.run_id) / stage, ignore_errors=True)


def stage_harvest(name: str, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    from spd_mcp.harvest import HarvestConfig, merge_shards, run_shard
    from spd_mcp.model.session import RunSession

    session = RunSession.load(name, device=a.device)
    _forget(session, "harvest")
    rss_load = _status_mb("VmHWM")
    cfg = HarvestConfig(n_tokens=a.harvest_tokens)
    # what harvest() does, timed in its two phases: the pass over the data, then the merge
    # (building the co-firing table from the firing log, writing the stage)
    shard, t_pass = _timed(lambda: run_shard(session, cfg))
    rss_pass = _status_mb("VmHWM")
    out, t_merge = _timed(lambda: merge_shards(session, cfg, 1, device=session.device))
    t = t_pass + t_merge
    return {"seconds": round(t, 3), "tokens": out.n_tokens,
            "tokens_per_s": round(out.n_tokens / t, 1), "pass_seconds": round(t_pass, 3),
            "pass_tokens_per_s": round(shard.n_tokens / t_pass, 1),
            "merge_seconds": round(t_merge, 3), "batch_size": cfg.batch_size,
            "peak_rss_after_load_mb": round(rss_load, 1),
            "peak_rss_after_pass_mb": round(rss_pass, 1), "status": out.status}


def stage_attributions(name: str, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    from spd_mcp.attributions import AttributionConfig, compute_attributions
    from spd_mcp.model.session import RunSession

    session = RunSession.load(name, device=a.device)
    _forget(session, "attributions")
    cfg = AttributionConfig(n_tokens=a.attr_tokens)
    out, t = _timed(lambda: compute_attributions(session, cfg))
    stage = Path(out.path)
    size = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
    return {"seconds": round(t, 3), "tokens": out.n_tokens,
            "tokens_per_s": round(out.n_tokens / t, 1), "stage_mb": round(size / 2**20, 1)}


def stage_label(name: str, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    from spd_mcp.harvest import load_harvest
    from spd_mcp.interp.autointerp import build_prompts, select_components, stage_config
    from spd_mcp.interp.client import LLMSettings
    from spd_mcp.model.session import RunSession

    session = RunSession.load(name, device=a.device)

    def start() -> tuple[list[str], int]:
        h = load_harvest(session)
        keys = select_components(h)
        stage_config(h, keys, LLMSettings())
        chars = 0
        for k in keys[: a.label_prompts]:
            system, user = build_prompts(session, h, k)
            chars += len(system) + len(user)
        return keys, chars

    (keys, chars), t = _timed(start)
    return {"seconds": round(t, 3), "components_to_label": len(keys),
            "prompts_built": min(a.label_prompts, len(keys)), "prompt_chars": chars}


STAGE_FNS = {"load": stage_load, "graph": stage_graph, "get_graph": stage_get_graph,
             "viewer": stage_viewer, "optimize": stage_optimize, "intervene": stage_intervene,
             "harvest": stage_harvest, "attributions": stage_attributions, "label": stage_label}


def _child(a: argparse.Namespace) -> None:
    """One stage in this (fresh) process; prints its JSON as the last line."""
    import resource

    import torch

    if a.mem_limit_gb > 0:  # fail with MemoryError rather than wake the OOM killer
        lim = int(a.mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (lim, lim))
    torch.set_num_threads(a.threads)
    os.environ["SPD_MCP_HOME"] = str(a.home)
    work = Path(a.home) / "bench"
    work.mkdir(parents=True, exist_ok=True)
    if a.child == "build":
        res = build_run(a.size, SIZES[a.size], a.density, work)
    else:
        res = STAGE_FNS[a.child](a.size, work, a)
    res["peak_rss_mb"] = round(_status_mb("VmHWM"), 1)
    gpu = _gpu_peak_mb()
    if gpu is not None:
        res["gpu_peak_mb"] = round(gpu, 1)
    print(json.dumps(res))


# --------------------------------------------------------------------------------- the driver
_PASS = ("threads", "device", "mem_limit_gb", "density", "opt_steps", "opt_tokens",
         "intervene_tokens", "harvest_tokens", "attr_tokens", "label_prompts")


def run_child(stage: str, size: str, home: Path, a: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", stage, "--size", size, "--home", str(home)]
    for k in _PASS:
        cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.stage_timeout)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-15:]
        return {"error": f"exit {p.returncode}", "stderr_tail": tail,
                "process_seconds": round(wall, 1)}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["process_seconds"] = round(wall, 1)
    return res


def exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y on log x (None with fewer than two usable points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True)
           if x and y and x > 0 and y > 0]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return round(sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts), 3)


def fit_exponents(result: dict[str, Any]) -> dict[str, Any]:
    sizes = [s for s in result["sizes"].values() if "stages" in s]
    out: dict[str, Any] = {"in_components": {}, "in_tokens": {}}
    for stage in STAGES:
        rows = [(s["components"], s["stages"].get(stage, {})) for s in sizes]
        rows = [(c, r) for c, r in rows if "seconds" in r]
        if len(rows) >= 2:
            S = [float(c) for c, _ in rows]
            per = "seconds_per_step" if stage == "optimize" else "seconds"  # steps may differ
            out["in_components"][stage] = {
                "time": exponent(S, [float(r[per]) for _, r in rows]),
                "peak_rss": exponent(S, [float(r["peak_rss_mb"]) for _, r in rows])}
            if all("gpu_peak_mb" in r for _, r in rows):
                out["in_components"][stage]["gpu_peak"] = exponent(
                    S, [float(r["gpu_peak_mb"]) for _, r in rows])
    for s in sizes:
        by = s["stages"].get("graph", {}).get("by_tokens")
        if by:
            T = [float(t) for t in by]
            out["in_tokens"][s["name"]] = {
                "graph_time": exponent(T, [float(r["seconds"]) for r in by.values()]),
                "graph_edges": exponent(T, [float(r["edges"]) for r in by.values()])}
    h = [(s["components"], s["stages"].get("harvest", {})) for s in sizes]
    h = [(c, r) for c, r in h if "peak_rss_mb" in r and "peak_rss_after_load_mb" in r]
    if len(h) >= 2:
        S = [float(c) for c, _ in h]
        out["in_components"]["harvest_rss_rise"] = exponent(
            S, [max(r["peak_rss_mb"] - r["peak_rss_after_load_mb"], 1.0) for _, r in h])
    return out


def markdown(result: dict[str, Any]) -> str:
    sizes = [s for s in result["sizes"].values() if "stages" in s]
    head = "| stage | " + " | ".join(
        f"{s['name']} ({s['components']:,} comp.)" for s in sizes) + " | exp. time / RSS |"
    lines = [head, "|" + "---|" * (len(sizes) + 2)]
    exps = result.get("exponents", {}).get("in_components", {})

    def cell(r: dict[str, Any]) -> str:
        if "error" in r:
            return f"FAILED ({r['error']})"
        if "seconds" not in r:
            return "–"
        s = f"{r['seconds']:.2f} s, {r['peak_rss_mb'] / 1024:.2f} GB"
        if "gpu_peak_mb" in r:
            s += f", GPU {r['gpu_peak_mb'] / 1024:.2f} GB"
        if "tokens_per_s" in r:
            s += f", {r['tokens_per_s']:,.0f} tok/s"
        return s

    for stage in STAGES:
        e = exps.get(stage, {})
        ex = f"{e.get('time')} / {e.get('peak_rss')}" if e else "–"
        lines.append(f"| {stage} | " + " | ".join(cell(s["stages"].get(stage, {}))
                                                  for s in sizes) + f" | {ex} |")
        if stage == "graph":
            for T in sorted({int(t) for s in sizes
                             for t in s["stages"].get("graph", {}).get("by_tokens", {})}):
                row = [s["stages"].get("graph", {}).get("by_tokens", {}).get(str(T)) for s in sizes]
                lines.append(f"| graph {T} tok | " + " | ".join(
                    f"{r['seconds']:.2f} s, {r['edges']:,} edges" if r else "–" for r in row)
                    + " | |")
    tok = result.get("exponents", {}).get("in_tokens", {})
    if tok:
        lines.append("")
        lines.append("compute_graph exponent in tokens (64/128/512): " + ", ".join(
            f"{k}: time {v['graph_time']}, edges {v['graph_edges']}" for k, v in tok.items()))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="small,medium,seed", help=f"of {', '.join(SIZES)}")
    p.add_argument("--stages", default="all", help=f"'all' or of {', '.join(STAGES)}")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--density", type=float, default=0.01,
                   help="fraction of (token, component) pairs with CI > 0")
    p.add_argument("--opt-steps", type=int, default=100)
    p.add_argument("--opt-tokens", type=int, default=64)
    p.add_argument("--intervene-tokens", type=int, default=128)
    p.add_argument("--harvest-tokens", type=int, default=16_384)
    p.add_argument("--attr-tokens", type=int, default=64,
                   help="tokens of dataset attributions (whole documents: at least this)")
    p.add_argument("--label-prompts", type=int, default=8, help="prompts built at start-up")
    p.add_argument("--mem-limit-gb", type=float, default=20.0,
                   help="data-segment limit per stage process (0: none)")
    p.add_argument("--stage-timeout", type=float, default=7200.0, help="seconds per stage")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--markdown", action="store_true", help="print a table (stderr) too")
    p.add_argument("--keep", type=Path, help="use/keep this SPD_MCP_HOME (default: temporary)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--home", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.child:
        _child(a)
        return
    sizes = a.sizes.split(",")
    bad = [s for s in sizes if s not in SIZES]
    stages = list(STAGES) if a.stages == "all" else a.stages.split(",")
    bad += [s for s in stages if s not in STAGES]
    if bad:
        p.error(f"unknown size or stage {bad}; sizes {list(SIZES)}, stages {list(STAGES)}")
    for s in list(stages):
        if s in NEEDS and NEEDS[s] not in stages:
            stages.insert(0, NEEDS[s])
    stages = [s for s in STAGES if s in stages]
    import torch

    home = a.keep or Path(tempfile.mkdtemp(prefix="spd-scale-"))
    result: dict[str, Any] = {
        "benchmark": "scale", "threads": a.threads, "device": a.device,
        "device_name": (torch.cuda.get_device_name() if a.device.startswith("cuda")
                        else platform.processor() or platform.machine()),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "density": a.density,
        "knobs": {k: getattr(a, k) for k in _PASS if k not in ("threads", "device")},
        "graph_tokens": list(GRAPH_TOKENS), "sizes": {}}
    try:
        for name in sizes:
            size = SIZES[name]
            row: dict[str, Any] = {"name": name, "components": n_components(size), **size}
            result["sizes"][name] = row
            if not (home / "runs" / name / "DONE").exists():
                row["build"] = run_child("build", name, home, a)
                if "error" in row["build"]:
                    print(f"[scale] {name}: build failed: {row['build']}", file=sys.stderr)
                    continue
            row["stages"] = {}
            for stage in stages:
                print(f"[scale] {name}: {stage} ...", file=sys.stderr, flush=True)
                row["stages"][stage] = r = run_child(stage, name, home, a)
                print(f"[scale] {name}: {stage}: {json.dumps(r)[:300]}", file=sys.stderr,
                      flush=True)
                if a.out:  # what is done so far, should a later stage never end
                    a.out.write_text(json.dumps(result, indent=1) + "\n")
            result["exponents"] = fit_exponents(result)
    finally:
        if a.keep is None:
            shutil.rmtree(home, ignore_errors=True)
    result["exponents"] = fit_exponents(result)
    text = json.dumps(result, indent=1)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)
    if a.markdown:
        print(markdown(result), file=sys.stderr)


if __name__ == "__main__":
    main()
