"""Drive an MCP server through real clients: the SDK client, the MCP Inspector CLI, Claude Code.

Every helper takes the server command as a parameter (e.g. `["spd-mcp", "serve", "--run", R]` or
`[sys.executable, STANDIN_SERVER]`), so the same tests run against the stand-in and the real server.
Children run in their own process group with output going to files; the group is killed on
teardown or timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcp import Client, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.realclients.node_tools import NodeTools, ensure_node_tools

STANDIN_SERVER = Path(__file__).with_name("standin_server.py")
STANDIN_COMMAND: tuple[str, ...] = (sys.executable, str(STANDIN_SERVER))
READY_RE = re.compile(r"SPD-MCP READY (\S+)")
# Quiet, offline Claude Code (see ENVIRONMENT.md).
CLAUDE_QUIET_ENV = {
    "DISABLE_TELEMETRY": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
}
# `claude -p` defaults: connect MCP servers before the first model request (2.1.197 otherwise
# starts after at most ~5 s, and a slow server's tools are missing from the first turns).
CLAUDE_PRINT_MCP_ENV = {
    "MCP_CONNECTION_NONBLOCKING": "false",
    "MCP_CONNECT_TIMEOUT_MS": "60000",
    "MCP_TIMEOUT": "60000",
}
# Inherited variables that would change what Claude Code does (keys, endpoints, nesting markers).
_CLAUDE_ENV_DROP = ("ANTHROPIC_", "CLAUDE", "ENABLE_TOOL_SEARCH", "MCP_", "MAX_MCP_OUTPUT_TOKENS")


class ClientRunError(RuntimeError):
    """A client or server child failed, exited early, or timed out (message has its output)."""


# -- processes -------------------------------------------------------------------------------------
def stop_process_group(proc: subprocess.Popen[Any], grace_s: float = 5.0) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it has not exited after `grace_s`."""
    if proc.poll() is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace_s)
                break
            except subprocess.TimeoutExpired:
                continue
    else:  # the leader is gone; sweep any children it left in its group
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@dataclass
class Completed:
    """A finished bounded child: exit status, captured output, where it was written."""

    returncode: int
    stdout: str
    stderr: str
    stdout_path: Path
    stderr_path: Path


def run_bounded(
    cmd: Sequence[str],
    log_dir: Path,
    name: str,
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Completed:
    """Run `cmd` in its own process group with output to `log_dir/name.{out,err}`; kill on timeout.

    Raises ClientRunError on timeout (with the output tails); a non-zero exit is returned.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process_group(proc, grace_s=2)
            raise ClientRunError(
                f"{name} timed out after {timeout:g}s: {list(cmd)}\nstdout:\n"
                f"{_tail(out_path)}\nstderr:\n{_tail(err_path)}"
            ) from None
        finally:
            stop_process_group(proc, grace_s=2)  # no stray grandchildren (e.g. stdio servers)
    return Completed(
        proc.returncode,
        out_path.read_text(errors="replace"),
        err_path.read_text(errors="replace"),
        out_path,
        err_path,
    )


@dataclass
class ServerProcess:
    """An MCP server child serving streamable HTTP."""

    proc: subprocess.Popen[bytes]
    url: str
    token: str | None
    stdout_path: Path
    stderr_path: Path

    @property
    def headers(self) -> dict[str, str]:
        """The headers a client must send (the bearer token, if any)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def log(self) -> str:
        """The server's stderr so far."""
        return _tail(self.stderr_path, 1_000_000)


@contextmanager
def http_server(
    command: Sequence[str],
    log_dir: Path,
    *,
    token: str | None = None,
    host: str = "127.0.0.1",
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    ready_timeout: float = 60.0,
) -> Iterator[ServerProcess]:
    """Start `command --http --host H --port 0 [--token T]` and yield it once READY is printed.

    The child is watched while waiting (an early exit raises with its stderr); on leaving, its
    process group is terminated. `env` is added to this process's environment.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    stem = f"server-{time.monotonic_ns()}"
    out_path, err_path = log_dir / f"{stem}.out", log_dir / f"{stem}.err"
    argv = [*command, "--http", "--host", host, "--port", "0"]
    if token:
        argv += ["--token", token]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            match = READY_RE.search(_tail(err_path, 1_000_000))
            if match:
                break
            if proc.poll() is not None:
                raise ClientRunError(
                    f"server exited with {proc.returncode} before READY: {argv}\n{_tail(err_path)}"
                )
            if time.monotonic() > deadline:
                raise ClientRunError(
                    f"server not READY after {ready_timeout:g}s: {argv}\n{_tail(err_path)}"
                )
            time.sleep(0.05)
        yield ServerProcess(proc, match.group(1), token, out_path, err_path)
    finally:
        stop_process_group(proc)


# -- the SDK client --------------------------------------------------------------------------------
@asynccontextmanager
async def sdk_stdio_client(
    command: Sequence[str],
    errlog: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> AsyncIterator[Client]:
    """An `mcp.Client` talking to `command` over stdio; the server's stderr goes to `errlog`.

    The child gets this process's full environment plus `env` (the SDK default passes only a few
    variables such as HOME and PATH).
    """
    params = StdioServerParameters(
        command=command[0], args=list(command[1:]), env={**os.environ, **(env or {})}, cwd=cwd
    )
    with open(errlog, "a", encoding="utf-8") as fh:
        async with Client(stdio_client(params, errlog=fh)) as client:
            yield client


@asynccontextmanager
async def sdk_http_client(url: str, *, token: str | None = None) -> AsyncIterator[Client]:
    """An `mcp.Client` over streamable HTTP, sending `Authorization: Bearer token` if given."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with (
        create_mcp_http_client(headers=headers) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        yield client


def exception_leaves(exc: BaseException) -> list[BaseException]:
    """The plain exceptions inside (nested) exception groups, e.g. from a failed SDK client."""
    if isinstance(exc, BaseExceptionGroup):
        return [x for sub in exc.exceptions for x in exception_leaves(sub)]
    return [exc]


# -- the MCP Inspector CLI -------------------------------------------------------------------------
def _inspector_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def inspector(
    target: Sequence[str] | str,
    method: str,
    log_dir: Path,
    *,
    tool_name: str | None = None,
    tool_args: Mapping[str, object] | None = None,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
    tools: NodeTools | None = None,
) -> dict[str, Any]:
    """Run the Inspector CLI (`tools/list`, `tools/call`, ...) and return its JSON answer.

    `target` is a server command (stdio) or an `http://.../mcp` URL (streamable HTTP; the
    Inspector 0.15.0 CLI cannot send headers, so the server must not require a token).
    Tool arguments are passed as `k=v` strings; the Inspector converts them by the tool's schema
    type (number/integer/boolean/object/array). Raises ClientRunError if the CLI fails.
    """
    tools = tools or ensure_node_tools()
    opts = ["--method", method]
    if tool_name:
        opts += ["--tool-name", tool_name]
    if tool_args:
        opts += ["--tool-arg", *(f"{k}={_inspector_value(v)}" for k, v in tool_args.items())]
    base = [str(tools.node), str(tools.inspector_cli)]
    if isinstance(target, str):
        argv = [*base, target, "--transport", "http", *opts]
    else:  # the command goes first (commander needs a target before `--`), its args after `--`
        argv = [*base, target[0], *opts, "--", *target[1:]]
    done = run_bounded(
        argv,
        log_dir,
        f"inspector-{time.monotonic_ns()}",
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if done.returncode != 0:
        raise ClientRunError(
            f"inspector failed ({done.returncode}): {argv}\n{done.stdout[-4000:]}"
            f"\n{done.stderr[-4000:]}"
        )
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise ClientRunError(f"inspector printed no JSON: {done.stdout[-4000:]}") from exc


# -- Claude Code -----------------------------------------------------------------------------------
def claude_env(
    home: Path, *, base_url: str | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for Claude Code in a throw-away HOME, quiet and offline.

    Inherits this process's environment (so a server it starts sees PATH, SPD_MCP_HOME, ...)
    minus ANTHROPIC_*/CLAUDE*/MCP_* variables; with `base_url`, points the CLI at that fake with a
    fake key and no retries. `extra` is applied last (e.g. ENABLE_TOOL_SEARCH, MCP_TOOL_TIMEOUT).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLAUDE_ENV_DROP)}
    env.update(CLAUDE_QUIET_ENV, HOME=str(home))
    if base_url is not None:
        env.update(
            ANTHROPIC_BASE_URL=base_url, ANTHROPIC_API_KEY="fake", CLAUDE_CODE_MAX_RETRIES="0"
        )
    env.update(extra or {})
    return env


def server_entry(
    *,
    command: Sequence[str] | None = None,
    url: str | None = None,
    token: str | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One `mcpServers` entry: stdio (`command`, optional `env`) or HTTP (`url`, optional token)."""
    if (command is None) == (url is None):
        raise ValueError("give exactly one of command and url")
    if command is not None:
        entry: dict[str, Any] = {"type": "stdio", "command": command[0], "args": list(command[1:])}
        if env:
            entry["env"] = dict(env)
        return entry
    entry = {"type": "http", "url": url}
    if token:
        entry["headers"] = {"Authorization": f"Bearer {token}"}
    return entry


def write_mcp_config(path: Path, name: str = "spd", **entry: Any) -> Path:
    """Write an MCP config file (`--mcp-config`) with one server; kwargs as for server_entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"mcpServers": {name: server_entry(**entry)}}, indent=2))
    return path


def claude_mcp_add(
    home: Path,
    name: str,
    *,
    command: Sequence[str] | None = None,
    url: str | None = None,
    token: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    tools: NodeTools | None = None,
) -> Completed:
    """`claude mcp add` (local scope of `home`, which is also the cwd) a stdio or HTTP server.

    HTTP: `claude mcp add --transport http NAME URL --header "Authorization: Bearer T"`.
    Raises ClientRunError when the CLI exits non-zero.
    """
    tools = tools or ensure_node_tools()
    argv = [str(tools.claude), "mcp", "add"]
    if url is not None:
        argv += ["--transport", "http", name, url]
        if token:
            argv += ["--header", f"Authorization: Bearer {token}"]
    elif command is not None:
        argv.append(name)  # before -e: claude's -e is variadic and would swallow the name
        for key, value in (env or {}).items():
            argv += ["-e", f"{key}={value}"]
        argv += ["--", *command]
    else:
        raise ValueError("give command or url")
    done = run_bounded(
        argv, home / ".logs", f"mcp-add-{name}", timeout=timeout, env=claude_env(home), cwd=home
    )
    if done.returncode != 0:
        raise ClientRunError(f"claude mcp add failed: {done.stdout}\n{done.stderr}")
    return done


_LIST_LINE = re.compile(r"^(?P<name>[^\s:]+): (?P<target>.*) - (?P<status>[✔✘!⚠].*)$")


@dataclass
class McpList:
    """`claude mcp list` output: raw text and each server's status ("✔ Connected", ...)."""

    stdout: str
    status: dict[str, str]

    def connected(self, name: str) -> bool:
        """Whether `name` health-checked as connected."""
        return self.status.get(name, "").startswith("✔")


def claude_mcp_list(
    home: Path,
    *,
    timeout: float = 90.0,
    tools: NodeTools | None = None,
    env: Mapping[str, str] | None = None,
) -> McpList:
    """`claude mcp list` in `home` (health-checks every server; exits 0 even when one fails)."""
    tools = tools or ensure_node_tools()
    done = run_bounded(
        [str(tools.claude), "mcp", "list"],
        home / ".logs",
        "mcp-list",
        timeout=timeout,
        env=claude_env(home, extra=env),
        cwd=home,
    )
    if done.returncode != 0:
        raise ClientRunError(f"claude mcp list failed: {done.stdout}\n{done.stderr}")
    status = {
        m["name"]: m["status"].strip()
        for line in done.stdout.splitlines()
        if (m := _LIST_LINE.match(line.strip()))
    }
    return McpList(done.stdout, status)


@dataclass
class ClaudeRun:
    """A finished `claude -p --output-format stream-json` run."""

    returncode: int
    lines: list[dict[str, Any]]  # every stream-json line, parsed, in order
    stderr: str
    stdout_path: Path
    unparsed: list[str] = field(default_factory=list)  # stdout lines that were not JSON

    @property
    def init(self) -> dict[str, Any] | None:
        """The `system/init` line (tools, mcp_servers with their status, model, ...)."""
        return next(
            (x for x in self.lines if x.get("type") == "system" and x.get("subtype") == "init"),
            None,
        )

    @property
    def result(self) -> dict[str, Any] | None:
        """The final `result` line (subtype, is_error, result text, num_turns, ...)."""
        return next((x for x in reversed(self.lines) if x.get("type") == "result"), None)

    @property
    def final_text(self) -> str:
        """The final answer text ('' without a result line)."""
        return str((self.result or {}).get("result") or "")

    def _blocks(self, role: str, kind: str) -> list[dict[str, Any]]:
        return [
            b
            for x in self.lines
            if x.get("type") == role
            for b in (x.get("message") or {}).get("content") or []
            if isinstance(b, dict) and b.get("type") == kind
        ]

    def tool_uses(self, name: str | None = None) -> list[dict[str, Any]]:
        """tool_use blocks the assistant made (optionally only those calling `name`)."""
        return [b for b in self._blocks("assistant", "tool_use") if name in (None, b["name"])]

    def tool_results(self, name: str | None = None) -> list[dict[str, Any]]:
        """tool_result blocks Claude Code sent back (optionally only for calls of `name`)."""
        ids = {b["id"] for b in self.tool_uses(name)}
        return [
            b
            for b in self._blocks("user", "tool_result")
            if name is None or b.get("tool_use_id") in ids
        ]

    def describe(self) -> str:
        """Everything useful for an assertion message."""
        return (
            f"rc={self.returncode}\nresult={json.dumps(self.result)[:2000]}\n"
            f"stderr:\n{self.stderr[-3000:]}\nlines:\n"
            + "\n".join(json.dumps(x)[:400] for x in self.lines[-12:])
        )


def run_claude_print(
    prompt: str,
    *,
    home: Path,
    base_url: str,
    mcp_config: Path,
    server_name: str = "spd",
    max_turns: int = 8,
    timeout: float = 120.0,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    tools: NodeTools | None = None,
) -> ClaudeRun:
    """Run `claude -p PROMPT` against a fake Messages API at `base_url` and parse its stream-json.

    Flags: `--output-format stream-json --verbose --mcp-config F --strict-mcp-config
    --allowedTools "mcp__<server_name>__*" --permission-mode dontAsk --setting-sources ""
    --max-turns N`, plus `extra_args`; cwd and HOME are `home`; `env` extends claude_env() after
    CLAUDE_PRINT_MCP_ENV (wait for MCP servers to connect before the first request).
    Raises ClientRunError on timeout; a non-zero exit is returned (see `describe()`).
    """
    tools = tools or ensure_node_tools()
    argv = [
        str(tools.claude),
        "-p",
        prompt,
        "--output-format",
        "stream-json",
        "--verbose",
        "--mcp-config",
        str(mcp_config),
        "--strict-mcp-config",
        "--allowedTools",
        f"mcp__{server_name}__*",
        "--permission-mode",
        "dontAsk",
        "--setting-sources",
        "",
        "--max-turns",
        str(max_turns),
        *extra_args,
    ]
    home.mkdir(parents=True, exist_ok=True)
    done = run_bounded(
        argv,
        home / ".logs",
        f"claude-p-{time.monotonic_ns()}",
        timeout=timeout,
        env=claude_env(home, base_url=base_url, extra={**CLAUDE_PRINT_MCP_ENV, **(env or {})}),
        cwd=home,
    )
    lines, unparsed = [], []
    for raw in done.stdout.splitlines():
        if raw.strip():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                unparsed.append(raw)
    return ClaudeRun(done.returncode, lines, done.stderr, done.stdout_path, unparsed)
