"""The editing tools through a real MCP client (in-memory SDK transport) and the CLI."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from mcp import Client

from spd_mcp.cli import main
from spd_mcp.editing.bake import load_edited_target
from spd_mcp.editing.train import rank_for_change
from spd_mcp.model.session import RunSession
from spd_mcp.server import build_server

PROMPT = ("once upon a time , a clever girl named laura lived in a house . everyone in the zoo "
          "liked the girl named laura . laura had a ball , and the ball was")


@pytest.fixture(scope="module")
def session() -> RunSession:
    return RunSession.load("tales")


@pytest.fixture(scope="module")
def ranked(session: RunSession) -> list[str]:
    """The 6 components most supporting red over blue here (``rank_for_change``); ablated
    together, red loses top-1 (asserted below)."""
    return [k for k, _ in rank_for_change(session, [PROMPT], "red", "blue", k=6)]


def _writes_d_model(key: str) -> bool:
    return not key.split(":")[0].endswith("mlp.up")  # mlp.up writes d_mlp, the rest d_model


def call(session: RunSession, db: Path, script) -> Any:
    async def main_() -> Any:
        async with Client(build_server(session=session, db_path=db)) as c:
            return await script(c)

    return asyncio.run(main_())


def test_edit_measure_generate_export(session: RunSession, ranked: list[str], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPD_MCP_HOME", str(tmp_path / "home"))
    ABLATE = [{"component": k, "scale": 0} for k in ranked]

    async def script(c: Client) -> dict[str, Any]:
        names = {t.name for t in (await c.list_tools()).tools}
        assert {"edit_components", "train_component_edit", "measure_edit", "list_edits",
                "export_edit"} <= names
        out: dict[str, Any] = {}
        r = await c.call_tool("edit_components", {"components": ABLATE, "name": "no red"})
        assert not r.is_error, r.content
        out["created"] = r.structured_content
        again = await c.call_tool("edit_components", {"components": ABLATE})
        assert again.structured_content["edit_id"] == out["created"]["edit_id"]
        assert again.structured_content["cached"] is True
        eid = out["created"]["edit_id"]
        r = await c.call_tool("create_prompt", {"text": PROMPT, "edit": eid})
        assert not r.is_error, r.content
        out["prompt"] = r.structured_content
        r = await c.call_tool("generate", {"text": PROMPT, "edit": eid, "max_new_tokens": 3})
        assert not r.is_error, r.content
        out["gen"] = r.structured_content
        r = await c.call_tool("measure_edit", {
            "edit_id": eid, "n_texts": 16, "probes": [{"prompt": PROMPT, "expected": "red"}],
            "token_groups": {"red": ["red"]}, "generation_prompts": [PROMPT]})
        assert not r.is_error, r.content
        out["m"] = r.structured_content
        r2 = await c.call_tool("measure_edit", {
            "edit_id": eid, "n_texts": 16, "probes": [{"prompt": PROMPT, "expected": "red"}],
            "token_groups": {"red": ["red"]}, "generation_prompts": [PROMPT]})
        assert r2.structured_content["cached"] is True
        r = await c.call_tool("list_edits", {})
        out["list"] = r.structured_content
        r = await c.call_tool("export_edit", {"edit_id": eid})
        assert not r.is_error, r.content
        out["export"] = r.structured_content
        # errors name the problem, and the server keeps serving
        bad = [
            ("edit_components", {"components": [{"component": "1.attn.v:999", "scale": 0}]},
             "0..127"),
            ("edit_components", {"components": [{"component": "1.attn.v:1", "scael": 0}]},
             "scael"),
            ("edit_components", {"components": [{"component": "1.attn.v:1", "scale": 99}]},
             "scale"),
            ("generate", {"text": PROMPT, "edit": 12345}, "edit 12345 does not exist"),
            ("measure_edit", {"edit_id": 777}, "edit 777 does not exist"),
            ("train_component_edit", {"components": ["1.attn.v:1"], "targets": [
                {"prompt": PROMPT, "token": "zebra"}]}, "zebra"),
            ("train_component_edit", {"components": ["1.attn.v:1"], "targets": [
                {"prompt": PROMPT, "token": "blue", "direction": "up"}]}, "direction"),
            ("export_edit", {"edit_id": 4242}, "does not exist"),
        ]
        for name, args, msg in bad:
            r = await c.call_tool(name, args)
            assert r.is_error, (name, args)
            assert msg in r.content[0].text, (msg, r.content[0].text)
        r = await c.call_tool("get_model_info", {})
        assert not r.is_error
        return out

    out = call(session, tmp_path / "app.db", script)
    p = out["prompt"]
    assert p["next_tokens"][0]["token"] == "red"
    assert p["next_tokens_edited"][0]["token"] != "red"
    assert out["gen"]["unedited_text"].startswith(PROMPT + " red .")  # the target says red
    assert out["gen"]["generated"][0] == p["next_tokens_edited"][0]["token"]
    m = out["m"]
    assert m["probes"]["drop_pct"] > 50
    [failed] = m["probes"]["failing"]  # the edit broke the one probe: it says how
    assert failed["expected"] == failed["target_got"] == "red" != failed["got"]
    assert failed["prompt_tail"].endswith(". laura had a ball , and the ball was")
    assert failed["prompt_tail"].startswith("… ") and failed["prob"] < 0.5
    assert m["token_groups"][0]["shift"] < 0
    assert m["generations"][0]["target"].startswith("red")
    ctl = m["control"]["components"]
    assert [k.rsplit(":", 1)[0] for k in ctl] == [a["component"].rsplit(":", 1)[0] for a in ABLATE]
    assert not set(ctl) & {a["component"] for a in ABLATE}
    assert m["control"]["probes"]["drop_pct"] < m["probes"]["drop_pct"]
    assert [e["edit_id"] for e in out["list"]["edits"]] == [out["created"]["edit_id"]]
    assert out["list"]["edits"][0]["name"] == "no red"
    standalone = load_edited_target(Path(out["export"]["path"]))
    x = session.ids_tensor(session.encode(PROMPT))
    with torch.no_grad():
        top = int(standalone(x)[0, -1].argmax())
    assert session.token_str(top) == p["next_tokens_edited"][0]["token"]


def test_train_tool_and_trained_control(session: RunSession, ranked: list[str],
                                        tmp_path: Path) -> None:
    pair = [k for k in ranked if _writes_d_model(k)][:2]
    assert len(pair) == 2, ranked

    async def script(c: Client) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        args = {"components": pair,
                "targets": [{"prompt": PROMPT, "token": "blue"}], "steps": 30, "lr": 0.05,
                "n_kl_texts": 8, "vectors": "write"}
        r = await c.call_tool("train_component_edit", args)
        assert not r.is_error, r.content
        r2 = await c.call_tool("train_component_edit", args)
        assert r2.structured_content["cached"] is True
        eid = r.structured_content["edit_id"]
        g = await c.call_tool("create_prompt", {"text": PROMPT, "edit": eid})
        m = await c.call_tool("measure_edit", {
            "edit_id": eid, "n_texts": 8, "behaviours": False,
            "probes": [{"prompt": PROMPT, "expected": "blue"}]})
        assert not m.is_error, m.content
        return r.structured_content, g.structured_content, m.structured_content

    trained, prompt, m = call(session, tmp_path / "app.db", script)
    rep = trained["report"]
    assert rep["mode"] == "components" and rep["n_trainable"] == 2 * 64
    assert rep["targets"][0]["after"] > 0.5 > rep["targets"][0]["before"]
    assert prompt["next_tokens_edited"][0]["token"] == "blue"
    # the control retrains the same recipe on random components of the same layer
    assert m["control"]["components"] != trained["components"]
    assert m["probes"]["edited_prob"] > 0.5


def test_cli_scale_list_export(ranked: list[str], tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SPD_MCP_HOME", str(tmp_path / "home"))
    a, b = ranked[:2]
    assert main(["edit", "scale", "tales", f"{a}=0", f"{b}=0", "--measure",
                 "--n-texts", "8", "--no-behaviours", "--json", "--probe",
                 f"{PROMPT} => red", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"edit 1: ablate {a}; ablate {b}")
    assert '"drop_pct"' in out
    assert main(["edit", "list", "tales"]) == 0
    assert f"ablate {a}" in capsys.readouterr().out
    assert main(["edit", "export", "tales", "1", "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "target.safetensors").is_file()
    assert main(["edit", "scale", "tales", "1.attn.v:15"]) == 2
    assert "COMPONENT=SCALE" in capsys.readouterr().err
    assert main(["edit", "measure", "tales", "9"]) == 2
    assert "edit 9 does not exist" in capsys.readouterr().err
    assert main(["edit", "train", "tales", "--component", "1.attn.v:15"]) == 2
    assert "--raise" in capsys.readouterr().err
