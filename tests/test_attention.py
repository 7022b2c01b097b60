"""get_attention: patterns equal the model's attention; the q×k split of a score is exact and
means what it says (ablating a term moves the score by its total); the `tales` induction head
attends to the name its cue introduced; tiny Hugging Face models (fused qkv, rotary, partial
rotary, grouped-query attention); the MCP tool and its errors."""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from mcp import Client

from spd_mcp.analysis.attention import (
    AttnCall,
    RawSplit,
    _Recorder,
    attention_forward,
    get_attention,
    head_patterns,
    split_score,
    summarise_split,
)
from spd_mcp.errors import InputError
from spd_mcp.model.config import parse_config
from spd_mcp.model.decompose import decompose
from spd_mcp.model.session import RunSession
from spd_mcp.model.zoo.tales.corpus import BEHAVIOURS
from spd_mcp.service.attention import attention
from tests.hf_models import FAMILIES, hf_config, save_tiny
from tests.test_server import PROMPT, with_client

HELD_OUT_SEED = 99  # the target trains on seed 0, SPD on seed 1


@pytest.fixture(scope="module")
def tales() -> RunSession:
    return RunSession.load("tales")


def _scaled_qk(call: AttnCall, head: int, q: int, k: int) -> float:
    qv = call.query.detach()[0, head, q].double()
    kv = call.key.detach()[0, call.kv_head(head), k].double()
    return float(qv @ kv) * call.scale


def _masked_score(s: RunSession, ids: list[int], layer: int, head: int, q: int, k: int,
                  off: dict[str, int]) -> float:
    """The score with component ``off[module]`` ablated at every position (delta kept)."""
    T = len(ids)
    masks = {}
    for mod, c in off.items():
        m = torch.ones(1, T, s.cm.Cs[mod])
        m[..., c] = 0
        masks[mod] = m
    rec = _Recorder()
    with torch.no_grad(), rec:
        s.cm(s.ids_tensor(ids), masks=masks, delta_masks=dict.fromkeys(masks, 1.0))
    return _scaled_qk(rec.calls[layer], head, q, k)


def _check_exact(raw: RawSplit, call: AttnCall, head: int, q: int, k: int) -> None:
    assert abs(float(raw.M.sum()) - raw.score) < 1e-5
    assert raw.score == pytest.approx(_scaled_qk(call, head, q, k), abs=1e-9)
    assert float(call.logits()[head, q, k]) == pytest.approx(raw.score, abs=1e-9)  # no mask


# ------------------------------------------------------------------------------------- tales
def test_tales_split_is_exact_and_ablating_a_term_moves_the_score_by_its_total(tales) -> None:
    s = tales
    ids = s.encode(BEHAVIOURS["induction"].probes(seed=HELD_OUT_SEED, n=1)[0].prompt)
    T = len(ids)
    calls = attention_forward(s, ids).calls
    for layer, head, q, k in [(0, 0, T - 1, 0), (0, 3, 7, 7), (1, 2, T - 1, 5), (1, 1, 20, 3),
                              (1, 3, T - 1, T - 2)]:
        raw = split_score(s, ids, layer, head, q, k)
        _check_exact(raw, calls[layer], head, q, k)
        assert raw.q_names[-2:] == ["q.other", "q.delta"]  # no biases in tales
        alive = (s.natural_ci(ids).ci[f"{layer}.attn.q"][q] > 0).sum()
        assert len(raw.q_names) == int(alive) + 2
    # semantics: a component's total is what ablating it (at every position) removes
    layer, head, q, k = 1, 2, T - 1, _intro(s.tokens(ids))[0]
    raw = split_score(s, ids, layer, head, q, k)
    qt, kt = raw.M.sum(1), raw.M.sum(0)
    i = next(i for i in qt.abs().argsort(descending=True).tolist() if raw.q_kinds[i] ==
             "components")
    j = next(j for j in kt.abs().argsort(descending=True).tolist() if raw.k_kinds[j] ==
             "components")
    qc, kc = int(raw.q_names[i].rsplit(":", 1)[1]), int(raw.k_names[j].rsplit(":", 1)[1])
    qm, km = s.to_module["1.attn.q"], s.to_module["1.attn.k"]
    assert abs(float(qt[i])) > 0.1 and abs(float(kt[j])) > 0.1
    got = _masked_score(s, ids, layer, head, q, k, {qm: qc})
    assert got == pytest.approx(raw.score - float(qt[i]), abs=1e-4)
    got = _masked_score(s, ids, layer, head, q, k, {km: kc})
    assert got == pytest.approx(raw.score - float(kt[j]), abs=1e-4)
    got = _masked_score(s, ids, layer, head, q, k, {qm: qc, km: kc})
    want = raw.score - float(qt[i]) - float(kt[j]) + float(raw.M[i, j])
    assert got == pytest.approx(want, abs=1e-4)


def test_tales_patterns_are_the_models_attention(tales) -> None:
    s = tales
    ids = s.encode(PROMPT)
    T = len(ids)
    fwd = attention_forward(s, ids)
    assert len(fwd.calls) == 2
    for call in fwd.calls:
        w = call.weights()
        assert torch.allclose(w.sum(-1), torch.ones_like(w[..., 0]))
        assert (w.triu(1) == 0).all()  # causal
        out = w @ call.value.detach()[0].double()
        assert (out - call.out.detach()[0].double()).abs().max() < 1e-5
    pats = head_patterns(s, ids, fwd, [0, 1], None, [T - 1, 2], top_k=4)
    assert len(pats) == 2 * 4 * 2
    for p in pats:
        w = fwd.calls[p.layer].weights()[p.head, p.query_pos]
        assert len(p.keys) == min(4, p.query_pos + 1)
        assert [k.pos for k in p.keys] == w.topk(len(p.keys)).indices.tolist()
        for kw in p.keys:
            assert kw.weight == pytest.approx(float(w[kw.pos]), abs=1e-4)
            assert kw.token == s.token_str(ids[kw.pos])


def _intro(tokens: list[str]) -> tuple[int, list[int]]:
    """The name introduced by the prompt's final cue bigram, and the other introduced names."""
    cue = tokens[-2:]
    T = len(tokens)
    intro = [j for j in range(2, T - 1) if tokens[j - 2:j] == cue]
    others = [j for j in range(2, T - 1)
              if tokens[j - 1] in ("named", "called") and tokens[j - 2:j] != cue]
    return intro[0], others


def test_tales_induction_head_attends_to_the_name_its_cue_introduced(tales) -> None:
    """Ground truth on held-out probes ('... the friend called theo ... the friend called' →
    'theo'): head 1.2 attends from the repeated cue word to the name that followed the cue's
    first occurrence, not to the other character's name; its score is carried by alive
    components on both sides."""
    s = tales
    probes = BEHAVIOURS["induction"].probes(seed=HELD_OUT_SEED, n=40)
    hits, w_intro, w_other = 0, [], []
    for pr in probes:
        ids = s.encode(pr.prompt)
        toks = s.tokens(ids)
        j, others = _intro(toks)
        assert toks[j] == pr.expected
        w = attention_forward(s, ids).calls[1].weights()[2, -1]
        hits += int(w.argmax()) == j
        w_intro.append(float(w[j]))
        w_other += [float(w[o]) for o in others]
    assert hits >= 0.9 * len(probes)  # measured 39/40
    assert statistics.median(w_intro) > 0.7  # measured 0.82
    assert statistics.mean(w_intro) > 5 * statistics.mean(w_other)
    for pr in probes[:6]:
        ids = s.encode(pr.prompt)
        T = len(ids)
        j, _ = _intro(s.tokens(ids))
        raw = split_score(s, ids, 1, 2, T - 1, j)
        assert abs(float(raw.M.sum()) - raw.score) < 1e-5 and raw.score > 2
        sm = summarise_split(s, ids, raw, 1, 2, T - 1, j, top=10)
        named = [p for p in sm.top_pairs if ":" in p.q and ":" in p.k]
        assert len(named) >= 4, sm.top_pairs  # measured 5-9 of the top 10
        # alive components × alive components: measured 0.88-1.87 × the score
        assert sm.by_kind["q.components x k.components"] > 0.75 * sm.score
        assert ":" in sm.q_totals[0].term or sm.q_totals[0].term == "q.other"
        top_q = max((t for t in sm.q_totals if t.ci is not None), key=lambda t: t.value)
        assert top_q.value > 0.15 * sm.score and top_q.ci > 0.5


def test_not_a_transformer_is_refused() -> None:
    toy = SimpleNamespace(topology=SimpleNamespace(n_blocks=0), run=SimpleNamespace(name="tms"))
    with pytest.raises(InputError, match="not a transformer"):
        get_attention(toy, [0], layers=[], heads=None, query_positions=[0])  # type: ignore[arg-type]
    st = SimpleNamespace(session=toy)
    with pytest.raises(InputError, match="get_attention needs a language-model run"):
        asyncio.run(attention(st, text="x", prompt_id=None))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- Hugging Face
@pytest.fixture(scope="module")
def hf_sessions(tmp_path_factory) -> dict[str, tuple[Path, RunSession]]:
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf_attn")
    out = {}
    for fam in FAMILIES:
        d, text = save_tiny(fam, root)
        run = decompose(parse_config(hf_config(fam, d, text, steps=4)), out=root / f"run-{fam}")
        out[fam] = (d, RunSession.load(str(run)))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_split_is_exact_and_patterns_match_eager_attention(hf_sessions, family: str) -> None:
    from transformers import AutoModelForCausalLM

    model_dir, s = hf_sessions[family]
    ids = s.encode(PROMPT)
    T = len(ids)
    calls = attention_forward(s, ids).calls
    eager = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager")
    with torch.no_grad():
        att = eager.eval()(torch.tensor([ids]), output_attentions=True).attentions
    for call, a in zip(calls, att, strict=True):
        assert (call.weights() - a[0].double()).abs().max() < 1e-5
    cfg = eager.config
    if family == "llama":  # grouped-query attention: 4 query heads read 2 key heads
        assert cfg.num_key_value_heads == 2 and calls[0].key.shape[1] in (2, 4)
    if family == "gpt_neox":
        assert cfg.rope_parameters["partial_rotary_factor"] < 1  # partial rotary
    for layer, head, q, k in [(0, 0, T - 1, 0), (0, 3, T - 1, T - 1), (1, 1, 5, 2),
                              (1, 2, T - 1, 4), (1, 3, 9, 8)]:
        raw = split_score(s, ids, layer, head, q, k)
        _check_exact(raw, calls[layer], head, q, k)
        if family == "llama":
            assert raw.kv_head == head // 2 or calls[layer].key.shape[1] == 4
            assert (raw.q_layer, raw.k_layer) == (f"{layer}.attn.q", f"{layer}.attn.k")
        else:  # fused: the same matrix's components on both sides, read at two positions
            assert raw.q_layer == raw.k_layer == f"{layer}.attn.qkv"
            assert raw.q_names[-3:] == ["q.other", "q.delta", "q.bias"]
            assert raw.k_names[-1] == "k.bias"


def test_gpt2_fused_terms_are_the_q_and_k_slices_of_the_write_vectors(hf_sessions) -> None:
    """No rotary in GPT-2: a q-term is a_c · U_c[q slice of the head], read off
    Topology.qkv_parts independently of the split's Jacobians."""
    _, s = hf_sessions["gpt2"]
    ids = s.encode(PROMPT)
    T = len(ids)
    layer, head, q, k = 1, 2, T - 1, 3
    raw = split_score(s, ids, layer, head, q, k)
    call = attention_forward(s, ids).calls[layer]
    mod = s.to_module[f"{layer}.attn.qkv"]
    comp = s.cm.component(mod)
    parts = s.topology.qkv_parts(comp.d_out)
    assert parts is not None
    _, inputs, _ = s.cm.forward_with_inputs(s.ids_tensor(ids))
    a = (inputs[mod][0].double() @ comp.V.detach().double())  # (T, C)
    U = comp.U.detach().double()
    key = call.key.detach()[0, head, k].double()
    qt = raw.M.sum(1)
    for i, name in enumerate(raw.q_names):
        if raw.q_kinds[i] != "components":
            continue
        c = int(name.rsplit(":", 1)[1])
        want = float(a[q, c] * U[c, parts["q"][head]] @ key) * call.scale
        assert float(qt[i]) == pytest.approx(want, abs=1e-6)
    query = call.query.detach()[0, head, q].double()
    kt = raw.M.sum(0)
    for j, name in enumerate(raw.k_names):
        if raw.k_kinds[j] == "components":
            c = int(name.rsplit(":", 1)[1])
            want = float(a[k, c] * U[c, parts["k"][head]] @ query) * call.scale
            assert float(kt[j]) == pytest.approx(want, abs=1e-6)


# ----------------------------------------------------------------------------------- MCP tool
BAD: list[tuple[dict[str, Any], str]] = [
    ({"text": PROMPT, "layers": [2]}, "layers[] 2 out of range (the model has 2 attention "
                                      "blocks: 0..1)"),
    ({"text": PROMPT, "heads": [9]}, "heads[] 9 out of range (4 heads: 0..3)"),
    ({"text": PROMPT, "query_positions": [12]}, "query_positions[] 12 out of range (prompt has"),
    ({"text": PROMPT, "query_positions": []}, "query_positions"),
    ({"text": PROMPT, "top_k": 0}, "top_k"),
    ({"text": PROMPT, "head": 1}, "head"),
    ({"prompt_id": 77}, "prompt_id 77 does not exist"),
    ({"text": PROMPT, "split": {"layer": 1, "head": 0}}, "key_position"),
    ({"text": PROMPT, "split": {"layer": 1, "head": 0, "key_position": 1, "pos": 2}}, "pos"),
    ({"text": PROMPT, "split": {"layer": 3, "head": 0, "key_position": 1}},
     "split.layer 3 out of range"),
    ({"text": PROMPT, "split": {"layer": 1, "head": 4, "key_position": 1}},
     "split.head 4 out of range (4 heads: 0..3)"),
    ({"text": PROMPT, "split": {"layer": 1, "head": 0, "key_position": 5, "query_position": 3}},
     "split.key_position 5 is after split.query_position 3"),
    ({"text": PROMPT, "split": {"layer": 1, "head": 0, "key_position": -13}},
     "split.key_position -13 out of range"),
]


def test_tool_answers_caches_and_refuses_bad_calls(tales, tmp_path: Path) -> None:
    async def fn(c: Client) -> None:
        tools = {t.name: t for t in (await c.list_tools()).tools}
        assert "get_attention" in tools
        assert tools["get_attention"].input_schema.get("additionalProperties") is False
        args = {"text": PROMPT, "layers": [1], "top_k": 3,
                "split": {"layer": 1, "head": 2, "key_position": 4}}
        r1 = await c.call_tool("get_attention", args)
        assert not r1.is_error, r1.content
        res = r1.structured_content
        assert not res["cached"] and res["n_layers"] == 2 and res["n_heads"] == 4
        assert [(p["layer"], p["head"]) for p in res["patterns"]] == [(1, h) for h in range(4)]
        assert all(len(p["keys"]) == 3 and p["query_pos"] == 11 for p in res["patterns"])
        sp = res["split"]
        assert (sp["query_pos"], sp["key_pos"], sp["key_token"]) == (11, 4, "ball")
        assert abs(sp["sum_of_terms"] - sp["score"]) < 1e-5
        assert sp["top_pairs"] and sp["q_totals"] and sp["k_totals"]
        assert sum(sp["by_kind"].values()) == pytest.approx(sp["score"], abs=1e-3)
        assert res["validity_note"].startswith("The decomposition fails validity checks")
        r2 = await c.call_tool("get_attention", {**args, "text": None, "prompt_id": 1})
        assert r2.structured_content["cached"] and r2.structured_content["run_id"] == res[
            "run_id"]
        for bad, needle in BAD:
            r = await c.call_tool("get_attention", bad)
            text = " ".join(getattr(b, "text", "") for b in r.content)
            assert r.is_error, (bad, text)
            assert needle in text, (bad, text)
            assert not (await c.call_tool("get_model_info", {})).is_error

    with_client(tales, tmp_path / "app.db", fn)


def test_edited_patterns_show_where_a_head_stops_looking(tmp_path: Path) -> None:
    """Agreement on tales: layer-1 head 3 attends from the verb position to a singular head
    noun; with the two key components found there switched off (an edit), it looks elsewhere."""
    s = RunSession.load("tales")
    text = ("once upon a time , a kind boy named tom lived in a house . the house behind the "
            "old ducks")
    head_pos = s.tokens(s.encode(text)).index("house", 15)

    async def fn(c: Any) -> tuple[Any, Any, Any]:
        plain = await c.call_tool("get_attention", {"text": text, "layers": [1], "heads": [3]})
        e = await c.call_tool("edit_components", {"components": [
            {"component": "1.attn.k:87", "scale": 0}, {"component": "1.attn.k:75", "scale": 0}]})
        eid = e.structured_content["edit_id"]
        edited = await c.call_tool("get_attention", {"text": text, "layers": [1], "heads": [3],
                                                     "edit": eid})
        bad = await c.call_tool("get_attention", {"text": text, "edit": eid, "split": {
            "layer": 1, "head": 3, "key_position": head_pos}})
        return plain, edited, bad

    plain, edited, bad = with_client(s, tmp_path / "app.db", fn)

    def weight(res: Any) -> float:
        (pat,) = res.structured_content["patterns"]
        return sum(k["weight"] for k in pat["keys"] if k["pos"] == head_pos)

    assert weight(plain) > 0.5 and weight(edited) < 0.5 * weight(plain), (
        weight(plain), weight(edited))
    assert bad.is_error and "split" in bad.content[0].text
