"""Every MCP tool through the SDK client on a Hugging Face run (a tiny random GPT-2: Conv1D
weights, a fused qkv matrix, byte-level BPE), with harvest, dataset attributions and a label
from the local fake Messages API."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from spd_mcp.model.config import parse_config
from spd_mcp.model.decompose import decompose
from spd_mcp.model.session import RunSession
from spd_mcp.server import build_server
from tests.hf_models import hf_config, save_tiny
from tests.realclients.fake_messages_api import FakeMessagesAPI, text_block
from tests.test_server import TOOLS

PROMPT = "mia found a ball in the park . the ball was"
EVIDENCE = [{"type": "ablation", "description": "p drops", "value": -0.5}]


@pytest.fixture(scope="module")
def hf_session(tmp_path_factory) -> RunSession:
    root = tmp_path_factory.mktemp("hf-tools")
    d, text = save_tiny("gpt2", root)
    run = decompose(parse_config(hf_config("gpt2", d, text, steps=10)), out=root / "run")
    return RunSession.load(str(run))


def every_tool(s: RunSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, prompt: str,
               comp: str, token: str, down: str, up: str) -> dict[str, Any]:
    """Call every MCP tool once through the SDK client (harvest, attributions and a label from
    the local fake Messages API included); assert none errs; return each tool's result."""
    from spd_mcp.attributions import AttributionConfig, compute_attributions
    from spd_mcp.harvest import HarvestConfig, harvest

    harvest(s, HarvestConfig(n_tokens=2000, batch_size=8))
    compute_attributions(s, AttributionConfig(n_tokens=600, batch_size=8))
    layer, c = comp.rsplit(":", 1)
    node = f"{layer}:2:{c}"
    w = prompt.split()  # two words swapped: the same token count
    calls: list[tuple[str, dict[str, Any]]] = [
        ("ping", {}),
        ("get_job", {"job_id": 1}),  # every call here ends within the job limit: no jobs
        ("get_model_info", {}),
        ("tokenize", {"text": prompt}),
        ("create_prompt", {"text": prompt}),
        ("search_dataset", {"query": prompt.split()[1], "limit": 3}),
        ("generate", {"text": prompt, "max_new_tokens": 3}),
        ("get_ci", {"text": prompt}),
        ("probe_component", {"text": prompt, "component": comp}),
        ("get_component_vectors", {"component": f"{down}:1"}),
        ("get_component_vectors", {"component": f"{layer}:1"}),
        ("find_components_by_examples", {"examples": [{"text": prompt}]}),
        ("compute_graph", {"text": prompt}),
        ("optimize_graph", {"text": prompt, "label_token": token, "steps": 5}),
        ("get_graph", {"graph_id": "$graph", "top_k": 5}),
        ("run_intervention", {"text": prompt, "nodes": [node]}),
        ("run_ablation", {"text": prompt, "components": [comp]}),
        ("sweep_ablation", {"text": prompt, "label_token": token, "greedy_steps": 2,
                            "random_controls": 2}),
        ("get_attention", {"text": prompt, "split": {"layer": 1, "head": 0, "key_position": 2}}),
        ("run_patching", {"clean": prompt, "corrupt": " ".join([w[0], w[2], w[1], *w[3:]]),
                          "label_token": token, "nodes": [node],
                          "layers_at_positions": [{"layer": layer, "positions": [-1]}],
                          "sweep": "layers", "top": 5}),
        ("get_component_info", {"component": comp}),
        ("get_component_activation_examples", {"component": comp, "limit": 3}),
        ("search_components", {"output_token": token, "rank_by": "pmi", "limit": 3}),
        ("get_component_attributions", {"key": f"{down}:1", "top_k": 3}),
        ("get_attribution_strength", {"source": f"{down}:1", "target": f"{up}:2"}),
        ("label_component", {"component": comp}),
        ("update_research_log", {"entry": "looked at one component"}),
        ("save_explanation", {"behaviour": "b", "components": [{"key": comp, "role": "r"}],
                              "evidence": EVIDENCE, "confidence": 0.3}),
        ("set_investigation_summary", {"title": "t", "summary": "s", "status": "inconclusive"}),
        ("save_graph_artifact", {"graph_id": "$graph", "title": "graph", "max_edges": 10}),
        ("submit_suggestion", {"text": "more", "category": "tool"}),
        ("get_investigation", {}),
        ("edit_components", {"components": [{"component": comp, "scale": 0}]}),
        ("train_component_edit", {"components": [f"{down}:1"], "steps": 3, "n_kl_texts": 2,
                                  "targets": [{"prompt": prompt, "token": token}]}),
        ("measure_edit", {"edit_id": "$edit", "n_texts": 4,
                          "probes": [{"prompt": prompt, "expected": token}]}),
        ("list_edits", {}),
        ("export_edit", {"edit_id": "$edit"}),
    ]
    assert {name for name, _ in calls} == TOOLS
    answer = {"label": "ball", "confidence": 0.5, "reasoning": "fires on ball"}
    with FakeMessagesAPI(lambda body: [text_block(json.dumps(answer))],
                         toolless_reply=None) as fake:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "fake")

        async def main() -> list[Any]:
            server = build_server(session=s, db_path=tmp_path / "app.db", auto_prepare=False,
                                  task_dir=tmp_path / "task")
            ids: dict[str, int] = {}
            out = []
            async with Client(server) as c:
                for n, a in calls:  # "$graph" / "$edit": the id the last such call returned
                    a = {k: ids[v[1:]] if isinstance(v, str) and v[:1] == "$" else v
                         for k, v in a.items()}
                    r = await c.call_tool(n, a)
                    sc = r.structured_content or {}
                    for kind in ("graph", "edit"):
                        if f"{kind}_id" in sc:
                            ids[kind] = sc[f"{kind}_id"]
                    out.append(r)
            return out

        results = asyncio.run(main())
    failed = {n: r.content[0].text for (n, _), r in zip(calls, results, strict=True)
              if r.is_error}
    assert "there is no job 1; there are no jobs" in failed.pop("get_job")
    assert not failed, "\n".join(f"{k}: {v}" for k, v in failed.items())
    out = {n: r.structured_content for (n, _), r in zip(calls, results, strict=True)}
    out["vectors_down"] = results[[n for n, _ in calls].index("get_component_vectors")
                                  ].structured_content
    return out


def test_every_tool_answers_on_a_gpt2_run(hf_session: RunSession, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = every_tool(hf_session, tmp_path, monkeypatch, prompt=PROMPT, comp="0.attn.qkv:3",
                     token=" the", down="0.mlp.down", up="1.mlp.up")
    tok = out["tokenize"]
    assert tok["unknown_words"] == [] and "".join(t["token"] for t in tok["tokens"]) == PROMPT
    assert out["vectors_down"]["writes_to"] == "residual stream"
    assert out["vectors_down"]["top_boosted"]
    qkv = out["get_component_vectors"]  # 0.attn.qkv:1 — its write vector split into q, k, v
    assert qkv["reads_from"] == "normalised residual stream"
    assert set(qkv["write_parts"]) == {"q", "k", "v"} and len(qkv["write_heads"]["q"]) == 4
    assert sum(v * v for v in qkv["write_parts"].values()) == pytest.approx(
        qkv["write_norm"] ** 2, rel=1e-3)
    assert out["get_model_info"]["layers"][0]["name"] == "0.attn.qkv"
    arch = out["get_model_info"]["architecture"]
    assert arch["type"] == "GPT2LMHeadModel" and arch["model_type"] == "gpt2"
    assert arch["n_layer"] == 2


def test_viewer_serves_a_gpt2_run(hf_session: RunSession) -> None:
    from starlette.testclient import TestClient

    from spd_mcp.viewer.app import create_app
    from tests.test_viewer_api import wait_job

    name = hf_session.run.name
    with TestClient(create_app(name, session=hf_session)) as client:
        info = client.get(f"/api/runs/{name}/info").json()
        assert info["layers"][0]["name"] == "0.attn.qkv"
        job = wait_job(client, client.post(f"/api/runs/{name}/graphs",
                                           json={"text": PROMPT}).json())
        assert job["status"] == "done", job
        gid = job["result"]["graph_id"]
        art = client.get(f"/api/runs/{name}/graphs/{gid}?max_edges=500").json()
        assert art["edges"] and art["layers"][0] == "embed"
        nodes = [n["key"] for n in art["nodes"] if n["layer"] not in ("embed", "output")][:3]
        job = wait_job(client, client.post(f"/api/runs/{name}/interventions", json={
            "text": PROMPT, "nodes": nodes, "label_token": " the", "pgd_steps": 2}).json())
        assert job["status"] == "done", job
        assert client.get(f"/api/runs/{name}/components/0.attn.qkv:3").status_code == 200
        page = client.get("/")
        assert page.status_code == 200
