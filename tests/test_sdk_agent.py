"""The built-in SDK agent (``python -m spd_mcp.sdkagent``) as a child process, against the real
spd-mcp server over HTTP and a scripted fake of the Messages API: a planned investigation, tool
errors, the turn and budget limits, setup failures and API retries."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from spd_mcp.sdkagent import AgentOptions, cost_usd, run_agent
from tests.realclients.clients import (
    ServerProcess,
    http_server,
    run_bounded,
    sdk_http_client,
    write_mcp_config,
)
from tests.realclients.fake_messages_api import (
    Failure,
    FakeMessagesAPI,
    scripted,
    text_block,
    tool_results,
)
from tests.realclients.fake_messages_api import tool_use_block as use

TOKEN = "sdk-agent-token"
COMMAND = [sys.executable, "-m", "spd_mcp.cli", "serve", "--run", "tales", "--threads", "1"]
BIG_USAGE = {"input_tokens": 1000, "output_tokens": 100, "cache_creation_input_tokens": 200,
             "cache_read_input_tokens": 300}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sdkagent")


@pytest.fixture(scope="module")
def server(work: Path) -> Iterator[ServerProcess]:
    with http_server(COMMAND, work / "logs", token=TOKEN,
                     env={"SPD_MCP_HOME": str(work / "home")}) as srv:
        yield srv


@pytest.fixture(scope="module")
def config(work: Path, server: ServerProcess) -> Path:
    return write_mcp_config(work / "mcp.json", url=server.url, token=TOKEN)


@dataclass
class AgentRun:
    returncode: int
    lines: list[dict[str, Any]]
    stderr: str

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [x for x in self.lines if x.get("type") == kind]

    @property
    def result(self) -> dict[str, Any]:
        assert self.lines and self.lines[-1]["type"] == "result", self.describe()
        return self.lines[-1]

    def describe(self) -> str:
        return f"rc={self.returncode}\nstderr:\n{self.stderr[-3000:]}\n" + "\n".join(
            json.dumps(x)[:500] for x in self.lines)


def agent(work: Path, config: Path, *args: str, base_url: str = "http://127.0.0.1:9",
          question: str = "Why does the model say 'he'?", timeout: float = 60) -> AgentRun:
    """Run the agent as a child process against the fake at `base_url`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    env.update(ANTHROPIC_BASE_URL=base_url, ANTHROPIC_API_KEY="test")
    argv = [sys.executable, "-m", "spd_mcp.sdkagent", "--mcp-config", str(config), *args,
            "--", question]
    done = run_bounded(argv, work / "agent-logs", f"agent-{os.urandom(4).hex()}",
                       timeout=timeout, env=env)
    lines = [json.loads(raw) for raw in done.stdout.splitlines() if raw.strip()]
    return AgentRun(done.returncode, lines, done.stderr)


def server_call(server: ServerProcess, tool: str, args: dict[str, Any]) -> str:
    """The server's text answer to one call, through the SDK client directly."""
    async def main() -> str:
        async with sdk_http_client(server.url, token=TOKEN) as client:
            res = await client.call_tool(tool, args)
            return "\n".join(b.text for b in res.content if b.type == "text")

    return anyio.run(main)


def test_planned_investigation(work: Path, config: Path, server: ServerProcess) -> None:
    """get_model_info → run_intervention planned from its JSON → an answer quoting a number."""
    seen: dict[str, Any] = {}

    def intervene(body: dict[str, Any]) -> dict[str, Any]:
        [res] = tool_results(body)
        assert not res.is_error, res.text
        info = json.loads(res.text)
        seen["info_text"] = res.text
        pronoun = next(b for b in info["planted_behaviours"] if b["name"] == "pronoun")
        seen["behaviour"] = pronoun
        node = f"{info['layers'][-1]['name']}:1:0"
        return {"usage": BIG_USAGE, "content": [use("mcp__spd__run_intervention", {
            "text": pronoun["example_prompt"], "nodes": [node], "regimes": ["ci", "ablated"],
            "loss": "label", "label_token": pronoun["expected_next_token"]})]}

    def answer(body: dict[str, Any]) -> dict[str, Any]:
        res = tool_results(body)[-1]
        assert not res.is_error, res.text
        seen["intervention"] = json.loads(res.text)
        p = seen["intervention"]["label_prob"]["target"]
        return {"usage": BIG_USAGE, "content": [text_block(f"P(he) in the target is {p:.4f}.")]}

    plan = scripted([use("mcp__spd__get_model_info", {})], intervene, answer)
    with FakeMessagesAPI(plan, toolless_reply=None) as fake:
        run = agent(work, config, "--model", "sonnet", "--max-turns", "6",
                    "--append-system-prompt", "METHODOLOGY-MARKER", base_url=fake.base_url)
        bodies = [r.body for r in fake.messages_requests("planned")]
    assert run.returncode == 0, run.describe()
    init = run.lines[0]
    assert init["type"] == "system" and init["subtype"] == "init", run.describe()
    assert {"mcp__spd__get_model_info", "mcp__spd__run_intervention"} <= set(init["tools"])
    assert init["mcp_servers"] == [{"name": "spd", "status": "connected"}]
    assert init["model"] == "claude-sonnet-4-5"
    assert [x["type"] for x in run.lines] == ["system", "assistant", "user", "assistant", "user",
                                              "assistant", "result"]
    # the request: resolved model, system prompt with the appended text, MCP tools with schemas
    first = bodies[0]
    assert first is not None and first["model"] == "claude-sonnet-4-5"
    [system] = first["system"]
    assert "spd MCP server" in system["text"] and "METHODOLOGY-MARKER" in system["text"]
    assert system["cache_control"] == {"type": "ephemeral"}  # prompt caching breakpoints
    assert first["messages"][0]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    assert "cache_control" in bodies[-1]["messages"][-1]["content"][-1]
    assert "cache_control" not in bodies[-1]["messages"][0]["content"][-1]
    tool = next(t for t in first["tools"] if t["name"] == "mcp__spd__run_intervention")
    assert "nodes" in tool["input_schema"]["properties"] and tool["description"]
    # the fake received the server's own answers, and they are in the stdout user lines
    assert seen["info_text"] == server_call(server, "get_model_info", {})
    sent = [b for x in run.of("user") for b in x["message"]["content"]]
    assert [b["content"][0]["text"] for b in sent] == [r.text for r in tool_results(bodies[-1])]
    assert not any(b.get("is_error") for b in sent)
    result = run.result
    p = seen["intervention"]["label_prob"]["target"]
    assert result["subtype"] == "success" and result["is_error"] is False
    assert result["num_turns"] == 3 and result["result"] == f"P(he) in the target is {p:.4f}."
    first_usage = run.of("assistant")[0]["message"]["usage"]
    usage = {k: 2 * v for k, v in BIG_USAGE.items()}
    usage["input_tokens"] += first_usage["input_tokens"]
    usage["output_tokens"] += first_usage["output_tokens"]
    assert result["usage"] == usage
    expected = (usage["input_tokens"] * 3 + usage["output_tokens"] * 15
                + usage["cache_creation_input_tokens"] * 3 * 1.25
                + usage["cache_read_input_tokens"] * 3 * 0.1) / 1e6
    assert result["total_cost_usd"] == pytest.approx(expected)
    assert result["session_id"] == init["session_id"] and result["duration_ms"] > 0


def test_tool_errors_come_back_and_the_loop_goes_on(work: Path, config: Path) -> None:
    """A bad node, an unknown tool and an over-long result: is_error texts, a truncation note."""
    plan = scripted(
        [use("mcp__spd__run_intervention", {"text": "the ball was", "nodes": ["nope:1:2"]}),
         use("mcp__spd__no_such_tool", {}),
         use("mcp__spd__get_model_info", {})],
        [text_block("I saw the errors.")])
    with FakeMessagesAPI(plan, toolless_reply=None) as fake:
        run = agent(work, config, "--max-turns", "4", "--max-result-chars", "300",
                    "--no-prompt-cache", base_url=fake.base_url)
        last = fake.messages_requests("planned")[-1].body
    assert last is not None and isinstance(last["system"], str)
    assert "cache_control" not in json.dumps(last)
    assert run.returncode == 0, run.describe()
    bad, unknown, info = tool_results(last)
    assert bad.is_error and "nope:1:2" in bad.text and "valid layers" in bad.text
    assert unknown.is_error and "unknown tool 'mcp__spd__no_such_tool'" in unknown.text
    assert "mcp__spd__get_model_info" in unknown.text
    assert not info.is_error and info.text.startswith("{")
    assert "[output truncated:" in info.text and len(info.text) < 500
    assert run.result["subtype"] == "success" and run.result["num_turns"] == 2


def test_max_turns(work: Path, config: Path) -> None:
    with FakeMessagesAPI(lambda body: [use("mcp__spd__ping", {"message": "hi"})],
                         toolless_reply=None) as fake:
        run = agent(work, config, "--max-turns", "1", base_url=fake.base_url)
        assert len(fake.messages_requests("planned")) == 1
    assert run.returncode == 1, run.describe()
    assert run.result["subtype"] == "error_max_turns" and run.result["is_error"] is True
    assert run.result["num_turns"] == 1
    [user] = run.of("user")  # the turn's tool calls still ran
    assert "hi" in user["message"]["content"][0]["content"][0]["text"]


def in_process(config: Path, base_url: str, monkeypatch: pytest.MonkeyPatch,
               **options: Any) -> list[dict[str, Any]]:
    """Run the importable core, run_agent, here; the lines it emitted."""
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", base_url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test")
    lines: list[dict[str, Any]] = []
    result = anyio.run(run_agent, AgentOptions(question="q", mcp_config=config, **options),
                       lines.append)
    assert result == lines[-1]
    return lines


def test_max_budget(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    huge = {"input_tokens": 1_000_000, "output_tokens": 10_000}
    with FakeMessagesAPI(lambda body: {"usage": huge, "content": [use("mcp__spd__ping", {})]},
                         toolless_reply=None) as fake:
        lines = in_process(config, fake.base_url, monkeypatch, model="haiku", max_budget_usd=0.5)
        assert len(fake.messages_requests("planned")) == 1
    assert [x["type"] for x in lines] == ["system", "assistant", "result"]  # no tools ran
    result = lines[-1]
    assert result["subtype"] == "error_max_budget_usd" and result["is_error"] is True
    assert result["num_turns"] == 1
    assert result["total_cost_usd"] == pytest.approx(1.0 + 0.05)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_setup_failures_exit_2(work: Path, server: ServerProcess) -> None:
    cases = {
        "missing": (work / "no-such-mcp.json", (), "cannot read MCP config"),
        "unreachable": (write_mcp_config(work / "dead.json", url=f"http://127.0.0.1:"
                                         f"{_closed_port()}/mcp", token=TOKEN), (),
                        "cannot connect to the MCP server"),
        "bad token": (write_mcp_config(work / "badtoken.json", url=server.url, token="wrong"),
                      (), f"(HTTP 401 from {server.url}; check the url and the Authorization"),
        "unpriced budget": (work / "no-such-mcp.json",
                            ("--model", "my-local-model", "--max-budget-usd", "1"),
                            "give --price-in and --price-out"),
    }
    for case, (path, args, reason) in cases.items():
        run = agent(work, path, *args)
        assert run.returncode == 2, f"{case}: {run.describe()}"
        result = run.result
        assert result["subtype"] == "error_during_execution" and result["is_error"], case
        assert reason in result["result"] and reason in run.stderr, f"{case}: {run.describe()}"
        assert not run.of("assistant"), case


def test_prices_and_unknown_models() -> None:
    opts = AgentOptions(question="q", mcp_config=Path("x"), model="my-model", max_budget_usd=1,
                        price_in=2, price_out=4)
    usage = {"input_tokens": 10**6, "output_tokens": 10**6, "cache_creation_input_tokens": 10**6,
             "cache_read_input_tokens": 10**6}
    assert cost_usd(usage, opts.prices()) == pytest.approx(2 + 4 + 2.5 + 0.2)
    unknown = AgentOptions(question="q", mcp_config=Path("x"), model="my-model")
    assert unknown.model_id == "my-model" and unknown.prices() is None
    assert AgentOptions(question="q", mcp_config=Path("x"), model="opus").prices() == (5, 25)


def test_api_failures_are_retried(work: Path, config: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeMessagesAPI(scripted([use("mcp__spd__ping", {})]), toolless_reply=None) as fake:
        fake.fail_next(Failure(500, retry_after=0.01, error_type="api_error"),
                       Failure(429, retry_after=0.01))
        run = agent(work, config, base_url=fake.base_url)
        kinds = [r.kind for r in fake.messages_requests()]
    assert run.returncode == 0, run.describe()
    assert kinds == ["failure", "failure", "planned", "planned"]
    assert run.result["subtype"] == "success" and run.result["result"] == "done"
    # no retries left: the run ends with the API's error
    with FakeMessagesAPI(scripted([use("mcp__spd__ping", {})]), toolless_reply=None) as fake:
        fake.fail_next(Failure(500, retry_after=0.01, error_type="api_error",
                               message="the fake is down"))
        lines = in_process(config, fake.base_url, monkeypatch, max_retries=0)
    result = lines[-1]
    assert result["subtype"] == "error_during_execution" and result["num_turns"] == 0
    assert "the fake is down" in result["result"] and "500" in result["result"]
