"""Fixes for problems agents reported with the knowledge / component / editing tools, checked on
the shipped `tales` run: activation signs in get_component_vectors, non-saturating token
rankings, failing probes in measure_edit, search_components(active_on=...) and its harvest
notice, and contrast sets in find_components_by_examples."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from mcp import Client

from spd_mcp.editing.edit import ComponentScale, edited_logits, scale_edit
from spd_mcp.editing.measure import MAX_FAILING, MeasureSettings, measure_edit
from spd_mcp.harvest import HarvestConfig, component_summary, harvest, load_harvest
from spd_mcp.model.session import RunSession
from spd_mcp.model.text import dataset_texts, encode_document
from spd_mcp.server import build_server

NAMES = ["mia", "tom", "laura", "ben", "zack", "hazel", "peter", "fiona", "ryan", "ted"]


@pytest.fixture(scope="module")
def session() -> RunSession:
    return RunSession.load("tales")


def run(session: RunSession, db: Path, fn: Callable[[Client], Awaitable[Any]],
        auto_prepare: bool = False) -> Any:
    async def main() -> Any:
        async with Client(build_server(session=session, db_path=db,
                                       auto_prepare=auto_prepare)) as c:
            return await fn(c)

    return asyncio.run(main())


def calls(session: RunSession, db: Path, todo: list[tuple[str, dict[str, Any]]],
          auto_prepare: bool = False) -> list[Any]:
    async def fn(c: Client) -> list[Any]:
        return [await c.call_tool(name, args) for name, args in todo]

    return run(session, db, fn, auto_prepare)  # type: ignore[no-any-return]


def small_harvest(session: RunSession) -> None:
    harvest(session, HarvestConfig(n_tokens=6000, batch_size=16))


def ablation_shift(session: RunSession, key: str, tokens: list[str], n_docs: int = 40
                   ) -> list[float]:
    """Mean change of log P(token) when ``key`` is ablated, over dataset positions where it is
    alive (natural CI > 0): negative = the component was raising the token there."""
    edit = scale_edit(session, [ComponentScale(component=key, scale=0, ci_threshold=None)])
    ck = session.keys.component(key)
    tids = [session.token_id(t) for t in tokens]
    total, n = torch.zeros(len(tids)), 0
    for text in dataset_texts(session, n_docs):
        ids = encode_document(session, text)
        alive = (session.natural_ci(ids).ci[ck.layer][:, ck.c] > 0).nonzero().flatten()
        if not len(alive):
            continue
        x = session.ids_tensor(ids)
        with torch.no_grad():
            before = torch.log_softmax(session.cm.target(x)[0].float(), -1)
            after = torch.log_softmax(edited_logits(session, edit, x)[0].float(), -1)
        total += (after - before)[alive][:, tids].sum(0)
        n += len(alive)
    assert n > 0, key
    return (total / n).tolist()


# ----------------------------------------------------------------------------------- 1
def test_vectors_report_the_activation_sign_and_its_flipped_effect(session: RunSession,
                                                                    tmp_path: Path) -> None:
    small_harvest(session)
    stats = load_harvest(session).stats
    summaries = [component_summary(stats, f"1.mlp.down:{c}") for c in range(128)]
    busy = [s for s in summaries if s.fire_count >= 30 and s.density < 0.5]
    neg = max((s for s in busy if s.frac_positive_when_firing == 0), key=lambda s: s.fire_count)
    pos = max((s for s in busy if s.frac_positive_when_firing == 1), key=lambda s: s.fire_count)
    vn, vp, vr = calls(session, tmp_path / "a.db", [
        ("get_component_vectors", {"component": neg.key, "top_k": 5}),
        ("get_component_vectors", {"component": pos.key, "top_k": 5}),
        ("get_component_vectors", {"component": "0.attn.v:3", "top_k": 5}),
    ])
    vn, vp, vr = vn.structured_content, vp.structured_content, vr.structured_content
    assert "activation × U[c]" in vn["effect_rule"]
    t = vn["typical_activation"]
    assert t["sign"] == "negative" and t["source"].startswith("harvest")
    assert t["n_firing"] == neg.fire_count and t["frac_positive"] == 0 and t["mean_act"] < 0
    boosted = [x["token"] for x in vn["top_boosted"]]
    suppressed = [x["token"] for x in vn["top_suppressed"]]
    assert vn["if_negative"] == {"boosts": suppressed, "suppresses": boosted}
    assert "NEGATIVE" in t["effect"] and str(suppressed) in t["effect"]
    assert vp["typical_activation"]["sign"] == "positive"
    # ground truth: ablating the negative component LOWERS what top_suppressed lists (it was
    # boosting it) and raises what top_boosted lists; the positive one is read as listed
    down_s, down_b = ablation_shift(session, neg.key, [suppressed[0], boosted[0]])
    print(f"\n{neg.key} (negative, {neg.fire_count} firings): ablation changes log P("
          f"{suppressed[0]}) by {down_s:+.3f}, log P({boosted[0]}) by {down_b:+.3f}")
    assert down_s < -0.1 and down_b > 0.1
    [up_b] = ablation_shift(session, pos.key, [vp["top_boosted"][0]["token"]])
    assert up_b < 0
    # the read side, both signs: layer-0 value components read the normalised embedding, so the
    # direct-path score is the activation itself
    hi, lo = vr["top_reading"][0], vr["top_reading_negative"][0]
    assert lo["score"] < 0 < hi["score"]
    ids = session.encode(f"the {hi['token']} and the {lo['token']}")
    acts = session.natural_ci(ids).acts["0.attn.v"][:, 3]
    assert float(acts[2]) == pytest.approx(hi["score"], abs=1e-3)
    assert float(acts[5]) == pytest.approx(lo["score"], abs=1e-3)
    assert set(vn["reading_components"]) == {"positive", "negative"}
    assert all(x["key"].startswith("1.mlp.up:") for x in vn["reading_components"]["negative"])


def test_vectors_without_a_harvest_use_a_dataset_sample(session: RunSession,
                                                        tmp_path: Path) -> None:
    [v] = calls(session, tmp_path / "a.db", [("get_component_vectors",
                                              {"component": "1.mlp.down:5", "top_k": 3})])
    t = v.structured_content["typical_activation"]
    assert "no harvest" in t["source"] and t["sign"] in ("positive", "negative", "mixed",
                                                         "never fires")


# ----------------------------------------------------------------------------------- 2
def test_token_rankings_do_not_saturate(session: RunSession, tmp_path: Path) -> None:
    small_harvest(session)
    [found] = calls(session, tmp_path / "a.db", [
        ("search_components", {"input_token": "ball", "limit": 5})])
    found = found.structured_content
    assert found["ranked_by"] == "smoothed_pmi" and "pseudo-firings" in found["notice"]
    top = found["components"][0]
    assert top["score"] == pytest.approx(top["detail"]["smoothed_pmi"], abs=1e-4)
    assert "pmi" in top["detail"]
    info, raw = calls(session, tmp_path / "a.db", [
        ("get_component_info", {"component": top["key"], "top_k": 10}),
        ("get_component_info", {"component": top["key"], "top_k": 10, "rank_tokens_by": "pmi"}),
    ])
    info, raw = info.structured_content, raw.structured_content
    assert info["tokens_ranked_by"].startswith("smoothed_pmi")
    assert raw["tokens_ranked_by"].startswith("pmi")
    # the reported problem: the raw-PMI list is a plateau of recall-1 tokens with one score
    plateau = [t for t in raw["top_input_tokens"] if t["recall"] == 1.0]
    assert len(plateau) >= 3 and len({t["pmi"] for t in plateau}) == 1
    toks = info["top_input_tokens"]
    scores = [t["smoothed_pmi"] for t in toks]
    assert scores == sorted(scores, reverse=True)
    recall1 = [t for t in toks if t["recall"] == 1.0]
    assert len({t["smoothed_pmi"] for t in recall1}) > 1  # more evidence ranks higher
    assert [t["count"] for t in recall1] == sorted((t["count"] for t in recall1), reverse=True)
    assert all({"count", "precision", "recall", "pmi"} <= set(t) for t in toks)


# ----------------------------------------------------------------------------------- 3
def test_measure_lists_failing_probes(session: RunSession) -> None:
    keys = ["1.mlp.down:42", "1.mlp.down:43", "1.mlp.down:85", "1.attn.o:118"]
    edit = scale_edit(session, [ComponentScale(component=k, scale=0) for k in keys])
    probes = [{"prompt": f"{n} had a ball , and the ball was", "expected": "red"} for n in NAMES]
    probes.append({"prompt": "mia had a ball , and the ball was", "expected": "blue"})
    m = measure_edit(session, edit, MeasureSettings(
        n_texts=4, control=False, n_behaviour_probes=20, probes=probes))
    assert m.probes is not None
    sets = [(b.n, b.edited, b) for b in m.behaviours] + [
        (m.probes.n, m.probes.edited_accuracy, m.probes)]
    assert any(b.failing for _, _, b in sets)
    for n, acc, b in sets:
        assert b.n_failing == round(n * (1 - acc))
        assert len(b.failing) == min(b.n_failing, MAX_FAILING)
        for f in b.failing:
            assert f.got != f.expected and 0 <= f.prob <= 1
            assert len(f.prompt_tail.removeprefix("… ").split()) <= 10
        edit_broken = [f.target_got == f.expected for f in b.failing]
        assert edit_broken == sorted(edit_broken, reverse=True)  # edit-broken first
    assert m.probes.n_failing == sum(r.edited_top1 != r.expected for r in m.probe_rows) >= 1
    wrong = m.probes.failing[-1]  # the target already misses it: listed, after edit-broken ones
    assert (wrong.expected, wrong.target_got, wrong.prompt_tail) == (
        "blue", "red", "mia had a ball , and the ball was")
    print("\n" + "; ".join(f"{b.behaviour} {b.target:.2f}->{b.edited:.2f} ({b.n_failing} failing)"
                           for b in m.behaviours))


# ----------------------------------------------------------------------------------- 4
def test_search_flags_components_idle_on_a_prompt_and_says_when_no_harvest(
        session: RunSession, tmp_path: Path) -> None:
    prompt = "the ball was red ."
    hits, no_harvest, bad = calls(session, tmp_path / "a.db", [
        ("search_components", {"output_token": "she", "limit": 10, "active_on": prompt}),
        ("search_components", {"input_token": "ball"}),
        ("search_components", {"output_token": "she", "active_on": "qqq"}),
    ])
    assert not hits.is_error, hits.content
    res = hits.structured_content
    nat = session.natural_ci(session.encode(prompt))
    dead = []
    for c in res["components"]:
        ck = session.keys.component(c["key"])
        alive = bool((nat.ci[ck.layer][:, ck.c] > 0).any())
        assert c["alive_on_prompt"] is alive
        dead += [] if alive else [c["key"]]
    assert dead and len(dead) < len(res["components"])
    assert f"{len(dead)} of 10 hits are not alive on the active_on prompt" in res["notice"]
    assert res["query"]["active_on"] == prompt
    # no harvest: the effect ranking works but says what it lacks; harvest rankings say how
    assert "No harvest" in res["notice"] and "spd-mcp prepare tales" in res["notice"]
    assert "builds it on their first call" in res["notice"]
    text = no_harvest.content[0].text
    assert no_harvest.is_error and "ranks by harvest statistics" in text
    assert "spd-mcp harvest tales" in text
    assert bad.is_error and "active_on" in bad.content[0].text


# ----------------------------------------------------------------------------------- 5
def test_examples_contrast_with_negatives(session: RunSession, tmp_path: Path) -> None:
    def ex(obj: str, names: list[str]) -> list[dict[str, Any]]:
        return [{"text": f"{n} lived in a house . {n} had a {obj} , and the {obj} was"}
                for n in names]

    contrast, background, bad_text, bad_pos = calls(session, tmp_path / "a.db", [
        ("find_components_by_examples", {"examples": ex("kite", NAMES[:5]),
                                         "negatives": ex("ball", NAMES[:5]), "top_k": 5}),
        ("find_components_by_examples", {"examples": ex("kite", NAMES[:5]), "top_k": 5}),
        ("find_components_by_examples", {"examples": ex("kite", NAMES[:1]),
                                         "negatives": [{"text": "qqq"}]}),
        ("find_components_by_examples", {"examples": ex("kite", NAMES[:1]),
                                         "negatives": [{"text": "the kite", "position": 9}]}),
    ])
    c, b = contrast.structured_content, background.structured_content
    assert c["n_negatives"] == 5 and "mean CI at the negatives" in c["score"]
    assert b["n_negatives"] == 0 and "dataset documents" in b["score"]
    for x in c["candidates"]:
        assert x["score"] == pytest.approx(x["mean_ci"] - x["negatives_mean_ci"], abs=2e-4)
    assert bad_text.is_error and "negatives[0].text" in bad_text.content[0].text
    assert bad_pos.is_error and "negatives[0].position 9" in bad_pos.content[0].text

    # ground truth on held-out names: the contrast picks separate kite from ball; the
    # background picks mostly fire on both
    def separation(keys: list[str]) -> float:
        diffs = []
        for k in keys:
            ck = session.keys.component(k)
            ci = {o: [float(session.natural_ci(ids := session.encode(e["text"]))
                            .ci[ck.layer][len(ids) - 1, ck.c]) for e in ex(o, NAMES[5:])]
                  for o in ("kite", "ball")}
            diffs.append(sum(ci["kite"]) / 5 - sum(ci["ball"]) / 5)
        return sum(diffs) / len(diffs)

    sep_c = separation([x["key"] for x in c["candidates"]])
    sep_b = separation([x["key"] for x in b["candidates"]])
    print(f"\nheld-out kite-vs-ball CI separation: contrast top-5 {sep_c:.2f}, "
          f"background top-5 {sep_b:.2f}")
    assert sep_c > 0.8 and sep_b < 0.5


def test_attention_components_map_to_heads() -> None:
    """q / k / v write vectors and o read vectors split by head; the norms add up (squares)."""
    from spd_mcp.analysis.components import component_vectors
    from spd_mcp.keys import ComponentKey
    from spd_mcp.model.session import RunSession

    s = RunSession.load("tales")
    heads = s.topology.n_heads
    assert heads
    o = component_vectors(s, ComponentKey("1.attn.o", 37))
    assert o.read_heads is not None and len(o.read_heads) == heads
    assert sum(x * x for x in o.read_heads) == pytest.approx(o.read_norm ** 2, rel=1e-3)
    k = component_vectors(s, ComponentKey("1.attn.k", 87))
    assert k.write_heads is not None and len(k.write_heads["k"]) * (
        s.topology.d_model // heads) == k.d_out
    assert sum(x * x for x in k.write_heads["k"]) == pytest.approx(k.write_norm ** 2, rel=1e-3)
