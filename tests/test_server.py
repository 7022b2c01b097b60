"""The MCP server through the SDK's in-process client: catalogue, caching, robustness."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from spd_mcp.model.session import RunSession
from spd_mcp.model.validity import Validity
from spd_mcp.server import build_server
from spd_mcp.service.model_info import note_for

TOOLS = {
    "ping", "get_model_info", "tokenize", "create_prompt", "search_dataset", "generate", "get_ci",
    "get_job",
    "probe_component", "get_component_vectors", "find_components_by_examples", "compute_graph",
    "optimize_graph", "get_graph", "run_intervention", "run_ablation", "sweep_ablation",
    "run_patching", "get_attention",
    "get_component_info",
    "get_component_activation_examples", "search_components", "get_component_attributions",
    "get_attribution_strength", "label_component", "update_research_log", "save_explanation",
    "set_investigation_summary", "save_graph_artifact", "submit_suggestion", "get_investigation",
    "edit_components", "train_component_edit", "measure_edit", "list_edits", "export_edit",
}
PROMPT = "mia found a ball in the park . the ball was"


@pytest.fixture(autouse=True)
def _no_llm_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def session() -> RunSession:
    return RunSession.load("tales")


def with_client(session: RunSession, db: Path, fn: Callable[[Client], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with Client(build_server(session=session, db_path=db, auto_prepare=False)) as client:
            return await fn(client)

    return asyncio.run(main())


def test_catalogue_has_schemas_and_annotations(session: RunSession, tmp_path: Path) -> None:
    async def fn(c: Client) -> None:
        tools = {t.name: t for t in (await c.list_tools()).tools}
        assert set(tools) == TOOLS
        for t in tools.values():
            assert t.input_schema.get("additionalProperties") is False, t.name
            assert t.output_schema is not None, t.name
            assert t.annotations is not None and t.annotations.read_only_hint is not None, t.name
            assert len(t.description or "") > 40, t.name
        assert tools["get_ci"].annotations.read_only_hint is True

    with_client(session, tmp_path / "app.db", fn)


def test_cheap_tools_and_caching(session: RunSession, tmp_path: Path) -> None:
    async def fn(c: Client) -> None:
        info = (await c.call_tool("get_model_info", {})).structured_content
        assert info["run"] == "tales" and len(info["layers"]) == 12
        assert {b["name"] for b in info["planted_behaviours"]} >= {"pronoun", "attribute"}
        # the shipped run's verdict: trustworthy under CI / random masks, not under an adversary
        validity = info["validity"]
        assert validity["ok"] is False and validity["recon_ratio"]["ci_masked"] < 0.01
        assert any(f.startswith("reconstruction with adversarial (PGD) masks")
                   for f in validity["failures"])
        assert validity["flagged_layers"] == {}  # every matrix <= 5% L0 (the shipped v2 run)
        tok = (await c.call_tool("tokenize", {"text": "the ball was zzz"})).structured_content
        assert tok["n_tokens"] == 5 and tok["unknown_words"] == ["zzz"]
        p1 = (await c.call_tool("create_prompt", {"text": PROMPT})).structured_content
        p2 = (await c.call_tool("create_prompt", {"text": PROMPT})).structured_content
        assert p1["prompt_id"] == p2["prompt_id"] and p1["tokens"][0] == "<bos>"
        assert p1["next_tokens"][0]["token"] == "red" and p1["next_tokens_edited"] is None
        found = (await c.call_tool("search_dataset", {"query": "friend called", "limit": 3})
                 ).structured_content
        assert found["total_matches"] > 100 and len(found["matches"]) == 3
        assert all("[[ friend called ]]" in m["context"] for m in found["matches"])
        g1 = (await c.call_tool("compute_graph", {"prompt_id": p1["prompt_id"]})
              ).structured_content
        g2 = (await c.call_tool("compute_graph", {"text": PROMPT})).structured_content
        assert not g1["cached"] and g2["cached"] and g1["graph_id"] == g2["graph_id"]
        assert any(o["output_token"] == "red" for o in g1["outputs"])
        assert g1["validity_note"].startswith("The decomposition fails validity checks")
        assert "fails under adversarial masks" in g1["validity_note"]
        assert g2["validity_note"].startswith("Validity caution as before")  # said once in full
        view = (await c.call_tool("get_graph", {"graph_id": g1["graph_id"], "top_k": 5})
                ).structured_content
        assert len(view["edges"]) == 5 and view["next_offset"] == 5 and view["notice"]
        vals = [abs(e["value"]) for e in view["edges"]]
        assert vals == sorted(vals, reverse=True)
        out_node = next(n["key"] for n in view["nodes"] if n["key"].startswith("output:"))
        nb = (await c.call_tool("get_graph", {"graph_id": g1["graph_id"], "node": out_node})
              ).structured_content
        assert nb["edges"] and all(out_node in (e["src"], e["tgt"]) for e in nb["edges"])
        gen = (await c.call_tool("generate", {"text": PROMPT, "max_new_tokens": 3})
               ).structured_content
        assert gen["generated"][0] == "red" and gen["token_probs"][0] > 0.5

    with_client(session, tmp_path / "app.db", fn)


# (tool, arguments, text the error must contain)
BAD_CALLS: list[tuple[str, dict[str, Any], str]] = [
    ("get_model_info", {"verbose": True}, "verbose"),
    ("ping", {"message": 3}, "message"),
    ("get_job", {"job_id": 7}, "there is no job 7; there are no jobs"),
    ("get_job", {"job_id": 1, "wait_s": 600}, "wait_s"),
    ("tokenize", {"text": 5}, "text"),
    ("tokenize", {"text": ""}, "text is empty"),
    ("tokenize", {"text": "a " * 3000}, "the limit is 4000"),
    ("create_prompt", {"text": "the ball was qqq"}, "words not in the vocabulary: ['qqq']"),
    ("create_prompt", {"text": " ".join(["the"] * 200)}, "the model's context is 128"),
    ("create_prompt", {}, "text"),
    ("search_dataset", {"query": "ball", "limit": 1000}, "limit"),
    ("search_dataset", {"query": "zzqx"}, "not in the vocabulary"),
    ("generate", {"text": PROMPT, "max_new_tokens": "many"}, "max_new_tokens"),
    ("generate", {"text": PROMPT, "prompt_id": 1}, "exactly one of text or prompt_id"),
    ("generate", {"prompt_id": 999}, "prompt_id 999 does not exist"),
    ("get_ci", {"text": PROMPT, "layers": ["7.mlp.up"]}, "unknown layer '7.mlp.up'; valid"),
    ("get_ci", {"text": PROMPT, "positions": [40]}, "out of range (prompt has 12 tokens"),
    ("get_ci", {"text": PROMPT, "treshold": 0.1}, "treshold"),
    ("probe_component", {"text": PROMPT, "component": "0.attn.q:128"}, "C=128: 0..127"),
    ("probe_component", {"text": PROMPT, "component": "0.attn.q"}, "must look like 'LAYER:C'"),
    ("get_component_vectors", {"component": "5.attn.q:1"}, "unknown layer '5.attn.q'"),
    ("get_component_vectors", {"component": "0.attn.q:1", "top_k": 0}, "top_k"),
    ("find_components_by_examples", {"examples": []}, "examples"),
    ("find_components_by_examples", {"examples": [{"text": PROMPT, "position": 30}]},
     "examples[0].position 30 out of range"),
    ("find_components_by_examples", {"examples": [{"text": "qqq"}]}, "examples[0].text"),
    ("find_components_by_examples",  # every bad example in one error
     {"examples": [{"text": "the qqq"}, {"text": "a ball"}, {"text": "zzz"}]},
     "examples[2].text: words not in the vocabulary: ['zzz']"),
    ("compute_graph", {"text": PROMPT, "output_position": 12}, "output_position 12 out of range"),
    ("compute_graph", {"text": PROMPT, "label_token": "qqq"}, "token 'qqq' is not in the vocab"),
    ("optimize_graph", {"text": PROMPT}, "needs label_token"),
    ("optimize_graph", {"text": PROMPT, "label_token": "red", "steps": 0}, "steps"),
    ("optimize_graph", {"text": PROMPT, "label_token": "red", "mask_type": "x"}, "mask_type"),
    ("optimize_graph", {"text": PROMPT, "label_token": "red", "loss": "logit_diff"},
     "needs contrast_token"),
    ("optimize_graph", {"text": PROMPT, "prompts": [{"text": PROMPT, "label_token": "red"}]},
     "give either prompts"),
    ("optimize_graph", {"prompts": [{"text": PROMPT, "label_token": "qqq"}]}, "prompts[0]"),
    ("get_graph", {"graph_id": 12345}, "graph_id 12345 does not exist"),
    ("run_intervention", {"text": PROMPT, "nodes": ["0.attn.q:12:1"]},
     "position 12 out of range (prompt has 12 tokens: 0..11)"),
    ("run_intervention", {"text": PROMPT, "nodes": ["0.attn.q:1:500"]}, "C=128"),
    ("run_intervention", {"text": PROMPT, "nodes": ["embed:1:0"]}, "unknown layer 'embed'"),
    ("run_intervention", {"text": PROMPT, "nodes": [], "regimes": ["magic"]}, "regimes"),
    ("run_intervention", {"text": PROMPT, "nodes": [], "loss": "label"}, "needs label_token"),
    ("run_ablation", {"text": PROMPT, "components": []}, "components"),
    ("sweep_ablation", {"text": PROMPT, "label_token": "red", "contrast_token": "red"},
     "contrast_token equals label_token"),
    ("sweep_ablation", {"text": PROMPT, "label_token": "red", "candidates": []}, "candidates"),
    ("sweep_ablation", {"text": PROMPT, "label_token": "red", "stop_prob": 1.5}, "stop_prob"),
    ("sweep_ablation", {"text": PROMPT, "label_token": "qqq"}, "qqq"),
    ("run_intervention", {"text": PROMPT, "nodes": ["*:*:*"]}, "'*:*:*' expands to"),
    ("search_components", {"output_token": "she", "active_on": "qqq"},
     "active_on: words not in the vocabulary: ['qqq']"),
    ("search_components", {"input_token": "ball", "rank_by": "lift"}, "rank_by"),
    ("get_component_info", {"component": "1.attn.o:5", "rank_tokens_by": "lift"},
     "rank_tokens_by"),
    ("find_components_by_examples", {"examples": [{"text": PROMPT}],
                                     "negatives": [{"text": "qqq"}]}, "negatives[0].text"),
    ("find_components_by_examples", {"examples": [{"text": PROMPT}],
                                     "negatives": [{"text": PROMPT, "position": 30}]},
     "negatives[0].position 30 out of range"),
    ("get_attention", {"text": PROMPT, "layers": [2]},
     "layers[] 2 out of range (the model has 2 attention blocks: 0..1)"),
    ("get_attention", {"text": PROMPT, "split": {"layer": 1, "head": 0, "query_position": 3,
                                                 "key_position": 5}},
     "split.key_position 5 is after split.query_position 3"),
    ("run_ablation", {"text": PROMPT, "components": ["1.attn.v:*:*"]}, "must look like"),
    ("run_ablation", {"text": PROMPT, "components": ["1.attn.v:1"], "contrast_token": "he"},
     "contrast_token needs label_token"),
    ("run_patching", {"clean": PROMPT, "corrupt": "mia found a ball", "label_token": "red",
                      "sweep": "layers"}, "give position_map"),
    ("run_patching", {"clean": PROMPT, "corrupt": PROMPT, "label_token": "red"},
     "nothing to patch"),
    ("run_patching", {"clean": PROMPT, "corrupt": PROMPT, "label_token": "red",
                      "layers_at_positions": [{"layer": "7.mlp.up"}]},
     "layers_at_positions[0].layer: unknown layer '7.mlp.up'"),
    ("run_patching", {"clean": PROMPT, "corrupt": PROMPT, "label_token": "red",
                      "position_map": {"40": 0}, "sweep": "nodes"},
     "position_map: clean position 40 out of range"),
    ("run_patching", {"clean": PROMPT, "corrupt": PROMPT, "label_token": "red",
                      "nodes": ["1.attn.v:*:*:*"]}, "nodes:"),
    ("get_component_info", {"component": "0.attn.q:128"}, "C=128: 0..127"),
    ("get_component_info", {"component": "1.attn.o:1", "top_k": 0}, "top_k"),
    ("get_component_activation_examples", {"component": "x"}, "must look like 'LAYER:C'"),
    ("get_component_activation_examples", {"component": "0.attn.q:1"}, "spd-mcp harvest"),
    ("search_components", {"output_token": "she", "input_token": "he"}, "at most one"),
    ("search_components", {}, "give output_token, input_token, label or layer"),
    ("search_components", {"layer": "3.attn.q"}, "unknown layer '3.attn.q'"),
    ("search_components", {"input_token": "she", "rank_by": "effect"}, "needs output_token"),
    ("search_components", {"output_token": "zzq"}, "token 'zzq' is not in the vocabulary"),
    ("get_component_attributions", {"key": "1.mlp.up:1", "direction": "up"}, "direction"),
    ("get_component_attributions", {"key": "1.mlp.up:1"}, "spd-mcp attributions tales"),
    ("get_attribution_strength", {"source": "1.mlp.up:1"}, "target"),
    ("label_component", {"component": "1.mlp.up:999"}, "C=128"),
    ("label_component", {"component": "1.mlp.up:9"}, "ANTHROPIC_API_KEY"),
    ("run_ablation", {"text": PROMPT, "components": ["1.mlp.down:5:3"]}, "'LAYER:C'"),
    ("update_research_log", {"entry": ""}, "entry"),
    ("save_explanation", {"behaviour": "b", "components": [{"key": "1.mlp.up:999", "role": "r"}],
                          "evidence": [{"type": "graph", "description": "d"}],
                          "confidence": 0.5}, "components[0].key"),
    ("set_investigation_summary", {"title": "t", "summary": "s", "status": "done"}, "status"),
    ("save_graph_artifact", {"graph_id": 12345, "title": "t"}, "graph_id 12345 does not exist"),
    ("submit_suggestion", {"text": "t", "kind": "x"}, "kind"),
    ("get_investigation", {"verbose": True}, "verbose"),
    ("edit_components", {"components": [{"component": "1.mlp.up:999", "scale": 0}]}, "0..127"),
    ("edit_components", {"components": []}, "components"),
    ("train_component_edit", {"components": ["1.mlp.up:1"], "targets": [
        {"prompt": PROMPT, "token": "qqq"}]}, "qqq"),
    ("train_component_edit", {"components": ["1.mlp.up:1"], "targets": []}, "targets"),
    ("measure_edit", {"edit_id": 9999}, "edit 9999 does not exist"),
    ("measure_edit", {"edit_id": 1, "n_texts": 0}, "n_texts"),
    ("list_edits", {"limit": 0}, "limit"),
    ("export_edit", {"edit_id": 31337}, "edit 31337 does not exist"),
    ("generate", {"text": PROMPT, "edit": 404}, "edit 404 does not exist"),
    ("create_prompt", {"text": PROMPT, "edit": 405}, "edit 405 does not exist"),
]


def test_bad_arguments_give_readable_errors_and_the_server_keeps_serving(
    session: RunSession, tmp_path: Path
) -> None:
    assert {t for t, _, _ in BAD_CALLS} == TOOLS  # every tool is exercised

    async def fn(c: Client) -> None:
        await c.call_tool("create_prompt", {"text": PROMPT})  # prompt 1 exists
        for tool, args, needle in BAD_CALLS:
            res = await c.call_tool(tool, args)
            text = " ".join(getattr(b, "text", "") for b in res.content)
            assert res.is_error, (tool, args, text)
            assert needle in text, (tool, args, text)
            ok = await c.call_tool("get_model_info", {})
            assert not ok.is_error

    with_client(session, tmp_path / "app.db", fn)


def test_validity_note_names_flagged_matrices() -> None:
    """The first shipped run's real verdict (grammar v1: two matrices above 5% L0)."""
    v = Validity.model_validate_json((Path(__file__).parent / "data" /
                                      "validity_tales_v1.json").read_text())
    used = note_for(v, ["1.attn.o", "0.attn.q"])
    assert used is not None and "fails under adversarial masks" in used
    assert "this result uses flagged matrices: 1.attn.o (L0 7.6% of C)" in used
    other = note_for(v, ["0.attn.q"])
    assert other is not None and "2 matrices are flagged (1.attn.o, 1.mlp.down)" in other
    assert note_for(v.model_copy(update={"failures": []}), ["1.attn.o"]) is None
