"""The real-client harness, proven against the stand-in server (no mocks of any client).

Clients: the MCP SDK (stdio and HTTP subprocesses), the MCP Inspector CLI, Claude Code
(`claude mcp list` and `claude -p` driven by the scripted fake Messages API).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import anthropic
import anyio
import httpx
import pytest
from mcp import MCPError

from tests.realclients.clients import (
    STANDIN_COMMAND,
    ServerProcess,
    claude_mcp_add,
    claude_mcp_list,
    exception_leaves,
    http_server,
    inspector,
    run_claude_print,
    sdk_http_client,
    sdk_stdio_client,
    write_mcp_config,
)
from tests.realclients.fake_messages_api import (
    Failure,
    FakeMessagesAPI,
    scripted,
    text_block,
    tool_results,
    tool_use_block,
    user_text,
)
from tests.realclients.node_tools import NodeTools, require_node_tools

TOKEN = "test-token-123"


def calls(log: Path) -> list[dict]:
    """Tool calls the stand-in server logged."""
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("realclients")


@pytest.fixture(scope="module")
def call_log(work: Path) -> Path:
    return work / "calls.jsonl"


@pytest.fixture(scope="module")
def command(call_log: Path) -> list[str]:
    """The server command under test (the stand-in, logging every tool call)."""
    return [*STANDIN_COMMAND, "--run", "standin", "--call-log", str(call_log)]


@pytest.fixture(scope="module")
def token_server(command: list[str], work: Path) -> Iterator[ServerProcess]:
    with http_server(command, work / "logs", token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def open_server(command: list[str], work: Path) -> Iterator[ServerProcess]:
    with http_server(command, work / "logs") as server:
        yield server


@pytest.fixture(scope="module")
def node() -> NodeTools:
    return require_node_tools()


# -- the SDK client --------------------------------------------------------------------------------
def test_sdk_client_over_stdio(command: list[str], work: Path, call_log: Path) -> None:
    async def main() -> None:
        async with sdk_stdio_client(command, work / "stdio.err") as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert {"echo", "add"} <= names
            result = await client.call_tool("add", {"a": 2, "b": 3.5})
            assert not result.is_error
            assert result.structured_content == {"result": 5.5}

    anyio.run(main)
    assert {"tool": "add", "arguments": {"a": 2, "b": 3.5}} in [
        {k: c[k] for k in ("tool", "arguments")} for c in calls(call_log)
    ]


def test_sdk_client_over_http_with_token(token_server: ServerProcess) -> None:
    async def main() -> None:
        async with sdk_http_client(token_server.url, token=TOKEN) as client:
            result = await client.call_tool("echo", {"text": "over http"})
            assert result.structured_content == {"result": "over http"}

    anyio.run(main)


def test_http_refuses_missing_or_wrong_token(token_server: ServerProcess) -> None:
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"},
        },
    }
    accept = {"accept": "application/json, text/event-stream"}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(token_server.url, json=init, headers={**accept, **headers}, timeout=10)
        assert r.status_code == 401
    r = httpx.post(token_server.url, json=init, headers={**accept, **token_server.headers})
    assert r.status_code == 200

    async def main() -> None:
        async with sdk_http_client(token_server.url) as client:
            await client.list_tools()

    # mcp 2.3.0 reports a non-2xx answer without a JSON-RPC body as a generic MCPError (-32603),
    # wrapped in task-group ExceptionGroups.
    with pytest.raises(BaseException) as info:
        anyio.run(main)
    assert any(isinstance(e, MCPError) for e in exception_leaves(info.value)), info.value


# -- the MCP Inspector CLI -------------------------------------------------------------------------
def test_inspector_over_stdio(node: NodeTools, command: list[str], work: Path) -> None:
    listed = inspector(command, "tools/list", work / "logs", tools=node)
    assert {"echo", "add"} <= {t["name"] for t in listed["tools"]}
    called = inspector(
        command,
        "tools/call",
        work / "logs",
        tool_name="add",
        tool_args={"a": 20, "b": 22},
        tools=node,
    )
    assert called["isError"] is False
    assert called["structuredContent"] == {"result": 42}


def test_inspector_over_http(node: NodeTools, open_server: ServerProcess, work: Path) -> None:
    listed = inspector(open_server.url, "tools/list", work / "logs", tools=node)
    assert {"echo", "add"} <= {t["name"] for t in listed["tools"]}
    called = inspector(
        open_server.url,
        "tools/call",
        work / "logs",
        tool_name="echo",
        tool_args={"text": "k=v, with spaces"},
        tools=node,
    )
    assert called["content"][0]["text"] == "k=v, with spaces"


# -- Claude Code -----------------------------------------------------------------------------------
def test_claude_mcp_list_connects(
    node: NodeTools, command: list[str], token_server: ServerProcess, tmp_path: Path
) -> None:
    claude_mcp_add(tmp_path, "spd", command=command, tools=node)
    claude_mcp_add(tmp_path, "spdhttp", url=token_server.url, token=TOKEN, tools=node)
    claude_mcp_add(tmp_path, "notoken", url=token_server.url, tools=node)
    listed = claude_mcp_list(tmp_path, tools=node)
    assert listed.connected("spd"), listed.stdout
    assert listed.connected("spdhttp"), listed.stdout
    assert listed.status["spd"] == "✔ Connected"
    assert not listed.connected("notoken"), listed.stdout


def add_then_answer(a: float, b: float) -> object:
    """Plan: call mcp__spd__add(a, b), then answer with the value the server returned."""

    def answer(body: dict) -> list[dict]:
        [result] = tool_results(body)
        assert not result.is_error, result
        value = json.loads(result.text)["result"]
        return [text_block(f"The sum is {value:g}.")]

    return scripted([tool_use_block("mcp__spd__add", {"a": a, "b": b})], answer)


def test_claude_print_calls_the_server(
    node: NodeTools, command: list[str], call_log: Path, tmp_path: Path
) -> None:
    config = write_mcp_config(tmp_path / "mcp.json", command=command)
    with FakeMessagesAPI(add_then_answer(1234, 4321)) as fake:
        run = run_claude_print(
            "Add 1234 and 4321.",
            home=tmp_path / "home",
            base_url=fake.base_url,
            mcp_config=config,
            max_turns=4,
            tools=node,
        )
    assert run.returncode == 0, run.describe()
    assert run.init and {"name": "spd", "status": "connected"} in run.init["mcp_servers"]
    assert "mcp__spd__add" in run.init["tools"]
    assert [u["input"] for u in run.tool_uses("mcp__spd__add")] == [{"a": 1234, "b": 4321}]
    [result] = run.tool_results("mcp__spd__add")
    assert "5555" in json.dumps(result["content"])
    assert run.result and run.result["subtype"] == "success"
    assert run.final_text == "The sum is 5555."
    assert {"tool": "add", "arguments": {"a": 1234, "b": 4321}} in [
        {k: c[k] for k in ("tool", "arguments")} for c in calls(call_log)
    ]
    planned = fake.messages_requests("planned")
    assert len(planned) == 2 and user_text(planned[0].body or {}) == "Add 1234 and 4321."


def test_claude_print_over_http_with_tool_search(
    node: NodeTools, token_server: ServerProcess, call_log: Path, tmp_path: Path
) -> None:
    """MCP tools hidden behind ToolSearch: the fake selects the tool first, then calls it."""
    config = write_mcp_config(tmp_path / "mcp.json", url=token_server.url, token=TOKEN)
    with FakeMessagesAPI(add_then_answer(0.5, 7)) as fake:
        run = run_claude_print(
            "Add 0.5 and 7.",
            home=tmp_path / "home",
            base_url=fake.base_url,
            mcp_config=config,
            max_turns=5,
            tools=node,
            env={"ENABLE_TOOL_SEARCH": "true"},
        )
    assert run.returncode == 0, run.describe()
    assert [u["input"] for u in run.tool_uses("ToolSearch")] == [{"query": "select:mcp__spd__add"}]
    assert run.final_text == "The sum is 7.5."
    assert [r.kind for r in fake.messages_requests()] == ["tool_search", "planned", "planned"]
    assert {"a": 0.5, "b": 7} in [c["arguments"] for c in calls(call_log)]


def test_claude_print_waits_for_a_slow_server(
    node: NodeTools, command: list[str], call_log: Path, tmp_path: Path
) -> None:
    """Non-blocking MCP start: the first turn lacks the tools, the fake calls WaitForMcpServers."""
    slow = ["bash", "-c", 'sleep 2; exec "$0" "$@"', *command]
    config = write_mcp_config(tmp_path / "mcp.json", command=slow)
    with FakeMessagesAPI(add_then_answer(-3, 10)) as fake:
        run = run_claude_print(
            "Add -3 and 10.",
            home=tmp_path / "home",
            base_url=fake.base_url,
            mcp_config=config,
            max_turns=8,
            tools=node,
            env={"MCP_CONNECTION_NONBLOCKING": "true"},
        )
    assert run.returncode == 0, run.describe()
    assert run.tool_uses("WaitForMcpServers"), run.describe()
    assert run.final_text == "The sum is 7."
    assert fake.messages_requests()[0].kind == "wait_for_mcp"
    assert {"a": -3, "b": 10} in [c["arguments"] for c in calls(call_log)]


# -- the fake itself, through the real anthropic SDK --------------------------------------------
def test_fake_serves_the_anthropic_sdk() -> None:
    def planner(body: dict) -> list[dict]:
        return [text_block(f"echo: {user_text(body)}"), tool_use_block("t", {"x": [1, 2]})]

    with ExitStack() as stack, FakeMessagesAPI(planner, toolless_reply=None) as fake:
        client = stack.enter_context(
            anthropic.Anthropic(base_url=fake.base_url, api_key="fake", max_retries=2)
        )
        kwargs = {"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
        msg = client.messages.create(**kwargs)
        assert msg.content[0].text == "echo: hi"
        assert msg.content[1].input == {"x": [1, 2]} and msg.stop_reason == "tool_use"
        with client.messages.stream(**kwargs) as stream:
            streamed = stream.get_final_message()
        assert streamed.content[0].text == "echo: hi" and streamed.content[1].input == {"x": [1, 2]}
        assert streamed.stop_reason == "tool_use"

        fake.fail_next(Failure(429, retry_after=0.01))
        assert client.messages.create(**kwargs).content[0].text == "echo: hi"  # retried
        fake.fail_next(Failure(malformed=True))
        with pytest.raises(ValueError):  # the SDK lets json.JSONDecodeError through
            client.messages.create(**kwargs)
        fake.fail_next(Failure(529, error_type="overloaded_error"), Failure(529), Failure(529))
        with pytest.raises(anthropic.APIStatusError):
            client.messages.create(**kwargs)
        assert client.messages.count_tokens(model="m", messages=kwargs["messages"]).input_tokens
        kinds = [r.kind for r in fake.messages_requests()]
        assert kinds == ["planned", "planned", "failure", "planned", "failure"] + ["failure"] * 3


def test_fake_counts_concurrency_and_reports_planner_errors() -> None:
    fake = FakeMessagesAPI(lambda body: [text_block("ok")], toolless_reply=None, delay_s=0.3)
    with fake, anthropic.Anthropic(base_url=fake.base_url, api_key="fake", max_retries=0) as client:
        kwargs = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
        threads = [threading.Thread(target=client.messages.create, kwargs=kwargs) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # The handler leaves after writing its response, possibly after the client returned.
        deadline = time.monotonic() + 5
        while fake.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fake.max_in_flight == 4 and fake.in_flight == 0

    broken = FakeMessagesAPI(lambda body: 1 / 0, toolless_reply=None)
    with (
        pytest.raises(AssertionError, match="ZeroDivisionError"),
        broken,
        anthropic.Anthropic(base_url=broken.base_url, api_key="fake", max_retries=0) as client,
        pytest.raises(anthropic.InternalServerError),
    ):
        client.messages.create(**kwargs)
