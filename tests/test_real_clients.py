"""The real spd-mcp server through real clients: the SDK over stdio and HTTP subprocesses, the MCP
Inspector CLI, and Claude Code (`claude mcp list`, and `claude -p` driven by a scripted fake of
the Messages API calling optimize_graph then run_intervention on `tales`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from spd_mcp.model.zoo.tales.corpus import BEHAVIOURS
from tests.realclients.clients import (
    ServerProcess,
    claude_mcp_add,
    claude_mcp_list,
    http_server,
    inspector,
    run_claude_print,
    sdk_http_client,
    sdk_stdio_client,
    write_mcp_config,
)
from tests.realclients.fake_messages_api import FakeMessagesAPI, scripted, text_block, tool_results
from tests.realclients.fake_messages_api import tool_use_block as use
from tests.realclients.node_tools import NodeTools, require_node_tools

TOKEN = "real-server-token"
COMMAND = [sys.executable, "-m", "spd_mcp.cli", "serve", "--run", "tales", "--threads", "1"]
PROBE = BEHAVIOURS["pronoun"].probes(seed=7, n=1)[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("real")


@pytest.fixture(scope="module")
def env(work: Path) -> dict[str, str]:
    return {"SPD_MCP_HOME": str(work / "home")}


@pytest.fixture(scope="module")
def token_server(work: Path, env: dict[str, str]) -> Iterator[ServerProcess]:
    with http_server(COMMAND, work / "logs", token=TOKEN, env=env) as server:
        yield server


@pytest.fixture(scope="module")
def open_server(work: Path, env: dict[str, str]) -> Iterator[ServerProcess]:
    with http_server(COMMAND, work / "logs-open", env=env) as server:
        yield server


@pytest.fixture(scope="module")
def node() -> NodeTools:
    return require_node_tools()


def test_sdk_over_stdio(work: Path, env: dict[str, str]) -> None:
    async def main() -> None:
        async with sdk_stdio_client(COMMAND, work / "stdio.err", env=env) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert {"optimize_graph", "run_intervention", "get_ci"} <= names
            res = await client.call_tool("get_ci", {"text": "the ball was", "top_per_position": 2})
            assert not res.is_error and res.structured_content["tokens"][-1] == "was"
            bad = await client.call_tool("get_ci", {"text": "the ball was", "layers": ["x"]})
            assert bad.is_error and "unknown layer 'x'" in bad.content[0].text

    anyio.run(main)


def test_sdk_over_http_with_token(token_server: ServerProcess) -> None:
    async def main() -> None:
        async with sdk_http_client(token_server.url, token=TOKEN) as client:
            info = await client.call_tool("get_model_info", {})
            assert info.structured_content["run"] == "tales"

    anyio.run(main)


def test_inspector_cli(node: NodeTools, work: Path, env: dict[str, str],
                       open_server: ServerProcess) -> None:
    listed = inspector(COMMAND, "tools/list", work / "logs", tools=node, env=env)
    assert "optimize_graph" in {t["name"] for t in listed["tools"]}
    called = inspector(COMMAND, "tools/call", work / "logs", tool_name="tokenize",
                       tool_args={"text": "the ball was"}, tools=node, env=env)
    assert called["isError"] is False and called["structuredContent"]["n_tokens"] == 4
    over_http = inspector(open_server.url, "tools/call", work / "logs", tool_name="ping",
                          tool_args={"message": "hi"}, tools=node)
    assert over_http["structuredContent"]["message"] == "hi"


def test_claude_mcp_list_connected(node: NodeTools, token_server: ServerProcess,
                                   tmp_path: Path, env: dict[str, str]) -> None:
    claude_mcp_add(tmp_path, "spd", command=COMMAND, env=env, tools=node)
    claude_mcp_add(tmp_path, "spdhttp", url=token_server.url, token=TOKEN, tools=node)
    listed = claude_mcp_list(tmp_path, tools=node)
    assert listed.status.get("spd") == "✔ Connected", listed.stdout
    assert listed.status.get("spdhttp") == "✔ Connected", listed.stdout


def test_claude_print_investigates_a_pronoun(node: NodeTools, token_server: ServerProcess,
                                            tmp_path: Path) -> None:
    """The fake plans optimize_graph → run_intervention from what the server returned, then
    answers quoting the returned numbers; Claude Code runs the real calls."""
    seen: dict[str, dict] = {}

    def intervene(body: dict) -> list[dict]:
        [res] = tool_results(body)
        assert not res.is_error, res.text
        graph = json.loads(res.text)
        seen["graph"] = graph
        nodes = [n["key"] for n in graph["circuit"]]
        return [use("mcp__spd__run_intervention", {
            "text": PROBE.prompt, "nodes": nodes, "regimes": ["ci", "ablated"],
            "loss": "label", "label_token": PROBE.expected})]

    def answer(body: dict) -> list[dict]:
        res = tool_results(body)[-1]
        assert not res.is_error, res.text
        inter = json.loads(res.text)
        seen["intervention"] = inter
        p = inter["label_prob"]
        return [text_block(
            f"The circuit has {len(seen['graph']['circuit'])} nodes. P({PROBE.expected}) is "
            f"{p['target']:.4f} in the target, {p['ci']:.4f} with only the circuit, and "
            f"{p['ablated']:.4f} with the circuit ablated.")]

    plan = scripted(
        [use("mcp__spd__optimize_graph", {"text": PROBE.prompt, "label_token": PROBE.expected})],
        intervene, answer,
    )
    config = write_mcp_config(tmp_path / "mcp.json", url=token_server.url, token=TOKEN)
    with FakeMessagesAPI(plan) as fake:
        run = run_claude_print(
            f"Why does the model predict '{PROBE.expected}' here? {PROBE.prompt}",
            home=tmp_path / "home", base_url=fake.base_url, mcp_config=config, max_turns=6,
            timeout=300, tools=node)
    assert run.returncode == 0, run.describe()
    assert [u["name"] for u in run.tool_uses()] == [
        "mcp__spd__optimize_graph", "mcp__spd__run_intervention"]
    p = seen["intervention"]["label_prob"]
    for value in (p["target"], p["ci"], p["ablated"]):
        assert f"{value:.4f}" in run.final_text
    assert str(len(seen["graph"]["circuit"])) in run.final_text
    assert p["ci"] >= 0.5 and p["ablated"] <= 0.5 * p["target"]
