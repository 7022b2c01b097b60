"""A built-in investigating agent: a tool-use loop on the Messages API over the spd MCP server.

A drop-in for ``claude -p`` in the launcher: it reads Claude Code's ``--mcp-config`` file, offers
the server's tools as ``mcp__<server>__<tool>``, and writes Claude Code's ``--output-format
stream-json --verbose`` lines on stdout (``system/init``, ``assistant``, ``user``, ``result``)::

    python -m spd_mcp.sdkagent --mcp-config MCP.json --max-turns 30 --model sonnet \\
        [--append-system-prompt TEXT] [--max-budget-usd X] -- QUESTION

The Anthropic client reads ``ANTHROPIC_API_KEY`` (or ``ANTHROPIC_AUTH_TOKEN``) and
``ANTHROPIC_BASE_URL`` from the environment, so any Messages-API endpoint works. Exit status: 0
success, 1 a run that ended early (turns, budget, an API error), 2 a setup failure (arguments,
config, server unreachable); a ``result`` line is written in every case.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spd_mcp.errors import InputError, OperationError

if TYPE_CHECKING:
    import anthropic
    from mcp import Client

Emit = Callable[[dict[str, Any]], None]
Subtype = Literal["success", "error_max_turns", "error_max_budget_usd", "error_during_execution"]

MODEL_ALIASES = {"opus": "claude-opus-4-5", "sonnet": "claude-sonnet-4-5",
                 "haiku": "claude-haiku-4-5"}
PRICES_PER_MTOK = {"opus": (5.0, 25.0), "sonnet": (3.0, 15.0), "haiku": (1.0, 5.0)}
"""USD per million (input, output) tokens by model family."""
CACHE_WRITE_FACTOR, CACHE_READ_FACTOR = 1.25, 0.1
EPHEMERAL = {"type": "ephemeral"}
USAGE_KEYS = ("input_tokens", "output_tokens", "cache_creation_input_tokens",
              "cache_read_input_tokens")
BASE_SYSTEM_PROMPT = (
    "You investigate a neural network through the tools of the {server} MCP server (named "
    "mcp__{server}__*). Call tools to gather evidence, base every claim on what they return, and "
    "finish with a plain-text answer to the user's question.")


class AgentSetupError(OperationError):
    """The agent could not start: bad options, a broken MCP config, an unreachable server."""


class AgentOptions(BaseModel):
    """What one agent run needs (the command line's flags)."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1)
    mcp_config: Path
    server: str | None = Field(None, description="mcpServers entry; default the only one, or spd")
    model: str = "sonnet"
    max_turns: int = Field(100, ge=1, description="assistant turns before error_max_turns")
    append_system_prompt: str | None = None
    max_budget_usd: float | None = Field(None, gt=0)
    price_in: float | None = Field(None, ge=0, description="USD per million input tokens")
    price_out: float | None = Field(None, ge=0, description="USD per million output tokens")
    max_tokens: int = Field(8192, ge=1)
    max_result_chars: int = Field(100_000, ge=100)
    max_retries: int | None = Field(None, ge=0, description="API retries (default the SDK's)")
    prompt_cache: bool = Field(True, description="mark cache breakpoints (system, last turn)")
    request_timeout_s: float = Field(600.0, gt=0)
    connect_timeout_s: float = Field(60.0, gt=0, description="MCP connect and tools/list")
    tool_timeout_s: float | None = Field(None, gt=0, description="per tool call")
    allowed_tools: list[str] | None = Field(
        None, description="name patterns (Claude Code's --allowedTools); others are denied")
    session_id: str = Field(default_factory=lambda: str(uuid.uuid4()))

    @model_validator(mode="after")
    def _prices(self) -> AgentOptions:
        if (self.price_in is None) != (self.price_out is None):
            raise ValueError("give both --price-in and --price-out, or neither")
        if self.max_budget_usd is not None and self.prices() is None:
            raise ValueError(
                f"--max-budget-usd needs prices, and model {self.model_id!r} is not in the price "
                f"table ({', '.join(PRICES_PER_MTOK)}): give --price-in and --price-out")
        return self

    @property
    def model_id(self) -> str:
        """The model id sent to the API (aliases resolved)."""
        return MODEL_ALIASES.get(self.model, self.model)

    def prices(self) -> tuple[float, float] | None:
        """USD per million (input, output) tokens, or None when unknown."""
        if self.price_in is not None and self.price_out is not None:
            return self.price_in, self.price_out
        name = self.model_id.lower()
        return next((p for family, p in PRICES_PER_MTOK.items() if family in name), None)


def cost_usd(usage: dict[str, int], prices: tuple[float, float] | None) -> float | None:
    """The price of `usage` (summed token counts) in USD, or None without prices."""
    if prices is None:
        return None
    p_in, p_out = prices
    return (usage["input_tokens"] * p_in + usage["output_tokens"] * p_out
            + usage["cache_creation_input_tokens"] * p_in * CACHE_WRITE_FACTOR
            + usage["cache_read_input_tokens"] * p_in * CACHE_READ_FACTOR) / 1e6


def load_server_entry(path: Path, server: str | None) -> tuple[str, dict[str, Any]]:
    """The (name, entry) to use from a Claude Code MCP config file."""
    try:
        config = json.loads(path.read_text())
    except OSError as exc:
        raise AgentSetupError(f"cannot read MCP config {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise AgentSetupError(f"MCP config {path} is not JSON: {exc}") from exc
    servers = config.get("mcpServers") if isinstance(config, dict) else None
    if not isinstance(servers, dict) or not servers:
        raise AgentSetupError(f"MCP config {path} has no mcpServers entries")
    if server is None:
        server = next(iter(servers)) if len(servers) == 1 else "spd"
    entry = servers.get(server)
    if not isinstance(entry, dict):
        raise AgentSetupError(f"MCP config {path} has no server {server!r} "
                              f"(it has: {', '.join(servers)}); pick one with --server")
    return server, entry


async def _connect(stack: AsyncExitStack, name: str, entry: dict[str, Any],
                   http_errors: list[str]) -> Client:
    """Enter an MCP client for a config entry on `stack` (HTTP error statuses go to
    `http_errors`, to explain a failed connection)."""
    import httpx2  # the SDKs load in seconds: only once the arguments and config are good
    from mcp import Client, StdioServerParameters
    from mcp.client.streamable_http import streamable_http_client

    kind = entry.get("type") or ("stdio" if "command" in entry else "http")
    if kind == "http":
        url = entry.get("url")
        if not isinstance(url, str):
            raise AgentSetupError(f"MCP server {name!r}: an http entry needs a url")

        async def note(response: httpx2.Response) -> None:
            if response.status_code >= 400:
                http_errors.append(f"HTTP {response.status_code} from {response.request.url}")

        http = await stack.enter_async_context(httpx2.AsyncClient(
            headers=dict(entry.get("headers") or {}), timeout=httpx2.Timeout(30.0, read=None),
            event_hooks={"response": [note]}))
        transport = streamable_http_client(url, http_client=http)
        return await stack.enter_async_context(Client(transport))
    if kind == "stdio":
        command = entry.get("command")
        if not isinstance(command, str):
            raise AgentSetupError(f"MCP server {name!r}: a stdio entry needs a command")
        params = StdioServerParameters(
            command=command, args=[str(a) for a in entry.get("args") or []],
            env={**os.environ, **{k: str(v) for k, v in (entry.get("env") or {}).items()}},
            cwd=entry.get("cwd"))
        return await stack.enter_async_context(Client(params))
    raise AgentSetupError(f"MCP server {name!r}: type {kind!r} is not supported (http, stdio)")


def _leaves(exc: BaseException) -> list[BaseException]:
    """The plain exceptions inside (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _describe(exc: BaseException) -> str:
    """A readable one-line reason, looking inside exception groups."""
    return "; ".join(f"{type(e).__name__}: {str(e).strip()}".removesuffix(": ")
                     for e in _leaves(exc))


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    return (f"{text[:limit]}\n\n[output truncated: {cut} of {len(text)} characters cut; ask for "
            "less, e.g. a smaller limit or top_k]")


def _result_blocks(result: Any, limit: int) -> list[dict[str, Any]]:
    """An MCP CallToolResult as tool_result content blocks (text truncated to `limit`)."""
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    for block in result.content:
        kind = getattr(block, "type", "?")
        if kind == "text":
            texts.append(block.text)
        elif kind == "image":
            images.append({"type": "image", "source": {
                "type": "base64", "media_type": block.mime_type, "data": block.data}})
        else:
            texts.append(f"[{kind} content not shown]")
    if not texts and result.structured_content is not None:
        texts.append(json.dumps(result.structured_content))
    text = _truncate("\n".join(texts), limit)
    return [{"type": "text", "text": text or "(no output)"}, *images]


def _error_result(tool_use_id: str, text: str) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": tool_use_id,
            "content": [{"type": "text", "text": text}], "is_error": True}


class _Run:
    """The running tallies of one agent run, and its result line."""

    def __init__(self, options: AgentOptions, emit: Emit) -> None:
        self.options, self.emit = options, emit
        self.started = time.monotonic()
        self.api_s = 0.0
        self.turns = 0
        self.usage = dict.fromkeys(USAGE_KEYS, 0)
        self.last_text = ""
        self.denials: list[dict[str, Any]] = []
        self.result: dict[str, Any] | None = None

    @property
    def cost(self) -> float | None:
        return cost_usd(self.usage, self.options.prices())

    def add_usage(self, usage: Any) -> None:
        for key in USAGE_KEYS:
            self.usage[key] += int(getattr(usage, key, 0) or 0)

    def finish(self, subtype: Subtype, error: str | None = None) -> dict[str, Any]:
        """Write the result line (once) and return it."""
        if self.result is not None:
            return self.result
        result: dict[str, Any] = {
            "type": "result", "subtype": subtype, "is_error": subtype != "success",
            "duration_ms": round((time.monotonic() - self.started) * 1000),
            "duration_api_ms": round(self.api_s * 1000), "num_turns": self.turns,
            "result": error if error is not None else self.last_text,
            "session_id": self.options.session_id, "total_cost_usd": self.cost,
            "usage": dict(self.usage), "permission_denials": self.denials,
        }
        if error is not None:
            result["errors"] = [error]
        self.result = result
        self.emit(result)
        return result


class _Agent:
    """One connected session: the MCP client, the API client and the conversation."""

    def __init__(self, run: _Run, server: str, mcp: Client, api: anthropic.AsyncAnthropic,
                 tools: list[dict[str, Any]]) -> None:
        self.run, self.options, self.server = run, run.options, server
        self.mcp, self.api, self.tools = mcp, api, tools
        self.prefix = f"mcp__{server}__"
        self.system = BASE_SYSTEM_PROMPT.format(server=server)
        if self.options.append_system_prompt:
            self.system += "\n\n" + self.options.append_system_prompt

    def line(self, kind: str, message: dict[str, Any]) -> None:
        self.run.emit({"type": kind, "message": message, "parent_tool_use_id": None,
                       "session_id": self.options.session_id})

    def request(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """The Messages API arguments; with prompt caching, breakpoints after the system prompt
        (tools and system) and on the conversation's last block (the turns so far)."""
        opts = self.options
        system: Any = self.system
        if opts.prompt_cache:
            system = [{"type": "text", "text": self.system, "cache_control": EPHEMERAL}]
            last = messages[-1]
            blocks = last["content"]
            blocks = [{"type": "text", "text": blocks}] if isinstance(blocks, str) else blocks
            marked = [*blocks[:-1], {**blocks[-1], "cache_control": EPHEMERAL}]
            messages = [*messages[:-1], {**last, "content": marked}]
        tools = {"tools": self.tools} if self.tools else {}
        return {"model": opts.model_id, "max_tokens": opts.max_tokens, "system": system,
                "messages": messages, "timeout": opts.request_timeout_s, **tools}

    async def loop(self) -> dict[str, Any]:
        """Alternate model turns and tool calls until an answer or a limit; the result line.

        The budget is checked after each reply that asks for tools (a final answer stands);
        the tools of the last allowed turn still run before error_max_turns.
        """
        import anthropic

        run, opts = self.run, self.options
        messages: list[dict[str, Any]] = [{"role": "user", "content": opts.question}]
        while True:
            began = time.monotonic()
            try:
                reply = await self.api.messages.create(**self.request(messages))
            except anthropic.APIError as exc:
                return run.finish("error_during_execution", f"API error: {_describe(exc)}")
            finally:
                run.api_s += time.monotonic() - began
            run.turns += 1
            run.add_usage(reply.usage)
            content = [b.model_dump(mode="json", exclude_none=True) for b in reply.content]
            message = {**reply.model_dump(mode="json", exclude_none=True), "content": content}
            self.line("assistant", message)
            messages.append({"role": "assistant", "content": content})
            texts = [b["text"] for b in content if b.get("type") == "text"]
            if texts:
                run.last_text = "\n".join(texts)
            uses = [b for b in content if b.get("type") == "tool_use"]
            if not uses:
                return run.finish("success")
            cost = run.cost
            if opts.max_budget_usd is not None and cost is not None and cost > opts.max_budget_usd:
                return run.finish("error_max_budget_usd")
            results = [await self.call(use) for use in uses]
            self.line("user", {"role": "user", "content": results})
            messages.append({"role": "user", "content": results})
            if run.turns >= opts.max_turns:
                return run.finish("error_max_turns")

    def allowed(self, name: str) -> bool:
        patterns = self.options.allowed_tools
        return patterns is None or any(
            fnmatchcase(name, p) or name.startswith(f"{p}__") for p in patterns)

    async def call(self, use: dict[str, Any]) -> dict[str, Any]:
        """Run one tool_use on the MCP server; every failure becomes an is_error result."""
        name, tool_use_id = str(use.get("name")), str(use.get("id"))
        known = [t["name"] for t in self.tools]
        if name not in known:
            return _error_result(tool_use_id, f"unknown tool {name!r}; the tools are: "
                                 f"{', '.join(known)}")
        if not self.allowed(name):
            self.run.denials.append({"tool_name": name, "tool_use_id": tool_use_id,
                                     "tool_input": use.get("input")})
            return _error_result(tool_use_id, f"permission to use {name} was denied")
        arguments = use.get("input")
        if not isinstance(arguments, dict):
            return _error_result(tool_use_id, f"tool input must be an object, got {arguments!r}")
        try:
            result = await self.mcp.call_tool(name.removeprefix(self.prefix), arguments,
                                              read_timeout_seconds=self.options.tool_timeout_s)
        except Exception as exc:  # the model reads why, and the run goes on
            return _error_result(tool_use_id, f"calling {name} failed: {_describe(exc)}")
        block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_use_id,
                                 "content": _result_blocks(result, self.options.max_result_chars)}
        if result.is_error:
            block["is_error"] = True
        return block


def _api_client(options: AgentOptions) -> anthropic.AsyncAnthropic:
    import anthropic

    kwargs: dict[str, Any] = {}
    if options.max_retries is not None:
        kwargs["max_retries"] = options.max_retries
    client = anthropic.AsyncAnthropic(**kwargs)
    if not (client.api_key or client.auth_token):
        raise AgentSetupError("no API key: set ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN)")
    return client


async def run_agent(options: AgentOptions, emit: Emit) -> dict[str, Any]:
    """Run one investigation, writing stream-json lines through `emit`; the result line.

    A setup failure (config, connection, tools/list, API key) writes an ``error_during_execution``
    result and raises AgentSetupError; a cancelled run writes one before the cancellation goes on.
    """
    run = _Run(options, emit)
    setup = True
    # The connect deadline covers the exit stack (the clients' task groups live in it) and is
    # lifted once the tools are listed.
    limit = anyio.CancelScope(deadline=anyio.current_time() + options.connect_timeout_s)
    timed_out = (f"the MCP server did not connect and list its tools within "
                 f"{options.connect_timeout_s:g} s")
    http_errors: list[str] = []
    try:
        name, entry = load_server_entry(options.mcp_config, options.server)
        with limit:
            async with AsyncExitStack() as stack:
                mcp = await _connect(stack, name, entry, http_errors)
                listed = (await mcp.list_tools()).tools
                limit.deadline = math.inf
                api = await stack.enter_async_context(_api_client(options))
                tools = [{"name": f"mcp__{name}__{t.name}", "description": t.description or "",
                          "input_schema": t.input_schema} for t in listed]
                emit({"type": "system", "subtype": "init", "session_id": options.session_id,
                      "cwd": os.getcwd(), "model": options.model_id,
                      "tools": [t["name"] for t in tools],
                      "mcp_servers": [{"name": name, "status": "connected"}],
                      "permissionMode": "dontAsk", "output_style": "default"})
                setup = False
                return await _Agent(run, name, mcp, api, tools).loop()
        raise AgentSetupError(timed_out)  # only reached when the deadline cancelled the setup
    except anyio.get_cancelled_exc_class():
        run.finish("error_during_execution", "interrupted")
        raise
    except Exception as exc:  # report, never end without a result line
        if run.result is not None:  # closing the connections failed after the run had finished
            print(f"sdkagent: while closing: {_describe(exc)}", file=sys.stderr)
            return run.result
        if isinstance(exc, AgentSetupError):
            reason = str(exc)
        elif setup:
            reason = timed_out if limit.cancel_called else (
                f"cannot connect to the MCP server: {_describe(exc)}")
            if http_errors:
                reason += f" ({http_errors[-1]}; check the url and the Authorization header)"
        elif any(type(e).__module__.startswith(("httpx", "mcp")) for e in _leaves(exc)):
            reason = f"lost the MCP server: {_describe(exc)}"  # API errors are handled in loop
        else:
            reason = _describe(exc)
        print(f"sdkagent: {reason}", file=sys.stderr)
        result = run.finish("error_during_execution", reason)
        if setup:
            raise AgentSetupError(reason) from exc
        return result


# -- the command line ------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise InputError(f"{self.prog}: {message}")


def parser() -> argparse.ArgumentParser:
    """The command line (Claude Code's flags; the ones that change nothing here are accepted)."""
    p = _Parser(prog="python -m spd_mcp.sdkagent",
                description="Investigate through an MCP server with any Messages-API endpoint; "
                            "stream-json lines on stdout, like `claude -p`.")
    p.add_argument("question", nargs="*", help="the question (after --)")
    p.add_argument("--mcp-config", required=True, type=Path)
    p.add_argument("--server", help="mcpServers entry (default: the only one, else spd)")
    p.add_argument("--model", default="sonnet", help="opus, sonnet, haiku, or a model id")
    p.add_argument("--max-turns", type=int, default=100)
    p.add_argument("--append-system-prompt")
    p.add_argument("--max-budget-usd", type=float)
    p.add_argument("--price-in", type=float, help="USD per million input tokens")
    p.add_argument("--price-out", type=float, help="USD per million output tokens")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--max-result-chars", type=int, default=100_000)
    p.add_argument("--max-retries", type=int, help="API retries (default: the SDK's)")
    p.add_argument("--no-prompt-cache", dest="prompt_cache", action="store_false",
                   help="send no cache_control breakpoints (for endpoints that refuse them)")
    p.add_argument("--allowedTools", "--allowed-tools", dest="allowed_tools", action="append",
                   help="tool name patterns the agent may call (others are denied)")
    compat = p.add_argument_group("accepted for compatibility with claude -p")
    compat.add_argument("-p", "--print", action="store_true")
    compat.add_argument("--verbose", action="store_true")
    compat.add_argument("--strict-mcp-config", action="store_true")
    compat.add_argument("--output-format", choices=["stream-json"], default="stream-json")
    compat.add_argument("--permission-mode")
    compat.add_argument("--setting-sources")
    return p


def _env_seconds(name: str) -> float | None:
    """A Claude Code timeout variable (milliseconds) in seconds."""
    try:
        return float(os.environ[name]) / 1000 or None
    except (KeyError, ValueError):
        return None


def options_from_args(argv: Sequence[str]) -> AgentOptions:
    """Parse the command line (raises InputError or pydantic's ValidationError)."""
    a = parser().parse_args(argv)
    question = " ".join(a.question).strip()
    if not question:
        raise InputError("no question: give it after the options (`-- QUESTION`)")
    patterns = [p for item in a.allowed_tools or [] for p in item.replace(",", " ").split()]
    extra = {k: v for k, v in (("connect_timeout_s", _env_seconds("MCP_TIMEOUT")),
                               ("tool_timeout_s", _env_seconds("MCP_TOOL_TIMEOUT"))) if v}
    return AgentOptions(
        question=question, mcp_config=a.mcp_config, server=a.server, model=a.model,
        max_turns=a.max_turns, append_system_prompt=a.append_system_prompt,
        max_budget_usd=a.max_budget_usd, price_in=a.price_in, price_out=a.price_out,
        max_tokens=a.max_tokens, max_result_chars=a.max_result_chars, max_retries=a.max_retries,
        prompt_cache=a.prompt_cache, allowed_tools=patterns or None, **extra)


def _emit_line(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _main(options: AgentOptions) -> int:
    """Run under SIGTERM/SIGINT handling (a stopped run still writes its result line)."""
    results: list[dict[str, Any]] = []

    def emit(obj: dict[str, Any]) -> None:
        if obj.get("type") == "result":
            results.append(obj)
        _emit_line(obj)

    async def cancel_on_signal(scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                scope.cancel()
                return

    with anyio.CancelScope() as outer:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_on_signal, outer)
            try:
                await run_agent(options, emit)
            except AgentSetupError:  # run_agent wrote the result line and told stderr
                return 2
            finally:
                tg.cancel_scope.cancel()
    return 0 if results and results[-1]["subtype"] == "success" else 1


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 success, 1 stopped early, 2 setup failure)."""
    try:
        options = options_from_args(sys.argv[1:] if argv is None else argv)
    except (InputError, ValidationError) as exc:
        reason = str(exc)
        if isinstance(exc, ValidationError):
            reason = "; ".join(
                ".".join(map(str, e["loc"])) + ": " * bool(e["loc"])
                + e["msg"].removeprefix("Value error, ") for e in exc.errors())
        print(f"sdkagent: {reason}", file=sys.stderr)
        _emit_line({"type": "result", "subtype": "error_during_execution", "is_error": True,
                    "duration_ms": 0, "duration_api_ms": 0, "num_turns": 0, "result": reason,
                    "errors": [reason], "session_id": None, "total_cost_usd": None,
                    "usage": dict.fromkeys(USAGE_KEYS, 0), "permission_denials": []})
        return 2
    return anyio.run(_main, options)


if __name__ == "__main__":
    sys.exit(main())
