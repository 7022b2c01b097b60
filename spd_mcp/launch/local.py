"""Run investigations on this machine: an MCP server (HTTP, per-task token) plus an agent.

The agent is ``claude -p`` (Claude Code), the built-in Messages-API agent (``sdk``:
``python -m spd_mcp.sdkagent``, the same command-line contract and stream-json output), or any
command (``cmd:...``, run by ``sh -c`` with the MCP config, question and limits in its
environment: see :data:`CMD_ENV`).

Every child runs in its own process group with its output going to files in the task directory
(never an undrained pipe). One single-threaded loop drives N independent investigations through
their phases (server starting → agent running → done), so SIGINT/SIGTERM, which raise in that loop,
stop every child group (TERM, then KILL after a grace period) before the launcher exits non-zero.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from spd_mcp.errors import OperationError, SpdMcpError
from spd_mcp.launch import taskdir as tasks

READY_RE = re.compile(rb"SPD-MCP READY (\S+)")
SOURCE = "launcher"
# Claude Code -p otherwise starts before a slow MCP server has connected (see ENVIRONMENT.md).
AGENT_ENV = {
    "MCP_CONNECTION_NONBLOCKING": "false",
    "MCP_CONNECT_TIMEOUT_MS": "60000",
    "MCP_TIMEOUT": "60000",
    "MCP_TOOL_TIMEOUT": "900000",  # optimize_graph and harvest-on-first-use can take minutes
}


CMD_ENV = {
    "SPD_MCP_CONFIG": "the MCP client config (Claude Code's mcp.json format, holds the token)",
    "SPD_MCP_URL": "the server's streamable-HTTP URL",
    "SPD_MCP_TOKEN": "the bearer token the server requires",
    "SPD_MCP_QUESTION_FILE": "the question alone",
    "SPD_MCP_SYSTEM_FILE": "the methodology (system prompt) text",
    "SPD_MCP_TASK_DIR": "the task directory (also the working directory)",
    "SPD_MCP_MAX_TURNS": "the turn cap",
    "SPD_MCP_MODEL": "the model option",
    "SPD_MCP_BUDGET_USD": "the spending cap per agent (empty when none)",
}
"""What a ``cmd:`` agent finds in its environment. Its stdout goes to ``agent_output.jsonl``;
a Claude-Code-style stream-json ``result`` line there (optional) reports turns, tokens and cost."""


class LaunchError(OperationError):
    """The launch could not proceed (no claude, server died before READY, ...)."""


class Interrupted(SpdMcpError):
    """SIGINT / SIGTERM arrived while the launcher was running."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class LaunchOptions(BaseModel):
    """Everything a local (or on-node) investigation launch needs."""

    model_config = ConfigDict(extra="forbid")

    run: str
    question: str = Field(min_length=1)
    agent: str = Field("claude", description="claude, sdk, or cmd:COMMAND")
    agents: int = Field(1, ge=1, le=64)
    max_turns: int = Field(50, ge=1)
    model: str = "opus"
    budget_usd: float | None = Field(None, gt=0)
    root: Path | None = None
    claude: str | None = None
    server_threads: int | None = Field(None, ge=1)
    ready_timeout_s: float = Field(300.0, gt=0)
    grace_s: float = Field(5.0, ge=0)
    agent_timeout_s: float | None = Field(None, gt=0)
    facts: dict[str, Any] = Field(default_factory=dict,
                                  description="extra launcher facts for task.json")

    @field_validator("agent")
    @classmethod
    def _agent(cls, v: str) -> str:
        if v in ("claude", "sdk") or (v.startswith("cmd:") and v[4:].strip()):
            return v
        raise ValueError(f"unknown agent {v!r}: use claude, sdk or cmd:COMMAND")

    @property
    def agent_kind(self) -> str:
        return "cmd" if self.agent.startswith("cmd:") else self.agent


def find_claude(explicit: str | None = None) -> str:
    """``--claude PATH``, else ``$SPD_MCP_CLAUDE``, else ``claude`` on PATH."""
    for candidate in (explicit, os.environ.get("SPD_MCP_CLAUDE")):
        if candidate:
            path = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
            if path is None:
                raise LaunchError(f"claude executable not found: {candidate}")
            return str(Path(path).resolve())
    found = shutil.which("claude")
    if found is None:
        raise LaunchError(
            "Claude Code CLI not found: install it (npm install -g @anthropic-ai/claude-code), or "
            "pass --claude PATH / set SPD_MCP_CLAUDE"
        )
    return found


def model_info(run: str) -> str:
    """A short description of the run for the methodology text (reads run.json; no torch)."""
    from spd_mcp.paths import runs_dir, shipped_runs_dir

    ref = Path(run)
    for cand in (ref, runs_dir() / run, shipped_runs_dir() / run):
        with suppress(OSError, ValueError, TypeError):
            meta = json.loads((cand / "run.json").read_text())
            layers = meta.get("layers") or {}
            sizes = ", ".join(f"{k} (C={v.get('C', '?')})" for k, v in list(layers.items())[:16])
            return (f"Run {meta.get('name', run)!r} (id {meta.get('run_id', '?')}), "
                    f"{len(layers)} decomposed layers: {sizes}.")
    return f"Run {run!r}; call get_model_info first."


def stop_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the child's process group, SIGKILL it after `grace_s`; always reap the child."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(proc.pid):
                break
            time.sleep(0.05)
        else:
            continue
        break
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # sweep anything left in the group
    proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _tail(path: Path, n: int = 3000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - n))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _result_line(path: Path) -> dict[str, Any] | None:
    """The last stream-json ``result`` line of the agent's output (None without one)."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return None
    for raw in reversed(lines):
        with suppress(json.JSONDecodeError, UnicodeDecodeError):
            obj = json.loads(raw)
            if isinstance(obj, dict) and obj.get("type") == "result":
                return obj
    return None


Phase = Literal["starting", "serving", "running", "done"]


@dataclass
class Investigation:
    """One task: its directory, server and agent children, and where it is."""

    opts: LaunchOptions
    claude: str | None = None
    index: int = 0
    task: tasks.TaskHandle | None = None
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    server: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None
    url: str | None = None
    phase: Phase = "starting"
    exit_code: int | None = None
    started: float = 0.0
    created_at: float = 0.0
    error: str | None = None

    @property
    def path(self) -> Path:
        assert self.task is not None
        return self.task.path

    def event(self, type: str, message: str, data: dict[str, Any] | None = None) -> None:
        if self.task is not None:
            self.task.append_event(SOURCE, type, message, data)

    # -- phases ------------------------------------------------------------------------------
    def create(self) -> None:
        self.created_at = time.monotonic()
        facts = tasks.launcher_facts({"kind": "local", "agent_index": self.index,
                                      "agent": self.opts.agent, "claude": self.claude,
                                      **self.opts.facts})
        self.task = tasks.create_task(self.opts.run, self.opts.question, root=self.opts.root,
                                      model=self.opts.model, max_turns=self.opts.max_turns,
                                      launcher=facts)
        self.event("launcher_started", f"launcher pid {os.getpid()} on {facts['host']}", facts)

    def start_server(self) -> None:
        argv = [sys.executable, "-m", "spd_mcp.cli", "serve", "--run", self.opts.run, "--http",
                "--host", "127.0.0.1", "--port", "0", "--task-dir", str(self.path)]
        if self.opts.server_threads:
            argv += ["--threads", str(self.opts.server_threads)]
        # The token goes through the environment, not argv (argv is visible in `ps`).
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SPD_MCP_TOKEN": self.token}
        with open(self.path / "server.log", "ab") as log:
            self.server = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                           env=env, cwd=self.path, start_new_session=True)
        self.started = time.monotonic()
        self.event("server_started", f"server pid {self.server.pid}", {"pid": self.server.pid})
        self.phase = "serving"

    def poll_server(self) -> None:
        """Advance to the agent once READY is in the log; fail if the server died or timed out."""
        assert self.server is not None
        match = READY_RE.search((self.path / "server.log").read_bytes())
        if match:
            self.url = match.group(1).decode()
            self.event("server_ready", f"server ready at {self.url}",
                       {"url": self.url, "pid": self.server.pid,
                        "seconds": round(time.monotonic() - self.started, 2)})
            self.start_agent()
        elif self.server.poll() is not None:
            self.fail(f"server exited with {self.server.returncode} before READY:\n"
                      f"{_tail(self.path / 'server.log')}")
        elif time.monotonic() - self.started > self.opts.ready_timeout_s:
            self.fail(f"server not READY after {self.opts.ready_timeout_s:g} s:\n"
                      f"{_tail(self.path / 'server.log')}")

    def write_inputs(self) -> tuple[Path, str]:
        info = model_info(self.opts.run)
        system = tasks.methodology(info)
        (self.path / "prompt.md").write_text(
            f"# Question\n\n{self.opts.question}\n\n# Methodology (appended system prompt)\n\n"
            f"{system}\n"
        )
        (self.path / "question.md").write_text(self.opts.question + "\n")
        (self.path / "system.md").write_text(system + "\n")
        config = {"mcpServers": {"spd": {"type": "http", "url": self.url,
                                         "headers": {"Authorization": f"Bearer {self.token}"}}}}
        mcp = self.path / "mcp.json"
        fd = os.open(mcp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the token
        with os.fdopen(fd, "w") as fh:
            json.dump(config, fh, indent=2)
        return mcp, system

    def agent_argv(self, mcp: Path, system: str) -> list[str]:
        if self.opts.agent_kind == "cmd":
            return ["/bin/sh", "-c", self.opts.agent[4:]]
        if self.opts.agent_kind == "sdk":
            argv = [sys.executable, "-m", "spd_mcp.sdkagent", "--mcp-config", str(mcp),
                    "--max-turns", str(self.opts.max_turns), "--model", self.opts.model,
                    "--append-system-prompt", system]
            if self.opts.budget_usd is not None:
                argv += ["--max-budget-usd", f"{self.opts.budget_usd:g}"]
            return [*argv, "--", self.opts.question]
        assert self.claude is not None
        argv = [self.claude, "-p", "--output-format", "stream-json", "--verbose",
                "--max-turns", str(self.opts.max_turns), "--model", self.opts.model,
                "--mcp-config", str(mcp), "--strict-mcp-config",
                "--allowedTools", "mcp__spd__*", "--permission-mode", "dontAsk",
                "--setting-sources", "", "--append-system-prompt", system]
        if self.opts.budget_usd is not None:
            argv += ["--max-budget-usd", f"{self.opts.budget_usd:g}"]
        return [*argv, "--", self.opts.question]

    def start_agent(self) -> None:
        mcp, system = self.write_inputs()
        env = {**os.environ, **AGENT_ENV}
        if self.opts.agent_kind == "cmd":
            env.update({
                "SPD_MCP_CONFIG": str(mcp), "SPD_MCP_URL": self.url or "",
                "SPD_MCP_TOKEN": self.token,
                "SPD_MCP_QUESTION_FILE": str(self.path / "question.md"),
                "SPD_MCP_SYSTEM_FILE": str(self.path / "system.md"),
                "SPD_MCP_TASK_DIR": str(self.path), "SPD_MCP_MAX_TURNS": str(self.opts.max_turns),
                "SPD_MCP_MODEL": self.opts.model,
                "SPD_MCP_BUDGET_USD": "" if self.opts.budget_usd is None
                else f"{self.opts.budget_usd:g}"})
        with (open(self.path / "agent_output.jsonl", "ab") as out,
              open(self.path / "agent.stderr.log", "ab") as err):
            self.agent = subprocess.Popen(self.agent_argv(mcp, system), stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=err, env=env, cwd=self.path,
                                          start_new_session=True)
        self.started = time.monotonic()
        self.event("agent_started", f"{self.opts.agent_kind} pid {self.agent.pid}",
                   {"pid": self.agent.pid, "agent": self.opts.agent_kind,
                    "model": self.opts.model,
                    "max_turns": self.opts.max_turns})
        self.phase = "running"

    def poll_agent(self) -> None:
        assert self.agent is not None
        code = self.agent.poll()
        limit = self.opts.agent_timeout_s
        if code is None and limit is not None and time.monotonic() - self.started > limit:
            stop_group(self.agent, self.opts.grace_s)
            self.event("agent_timeout", f"agent stopped after {limit:g} s", {"seconds": limit})
            code = self.agent.returncode
        if code is None:
            return
        result = _result_line(self.path / "agent_output.jsonl") or {}
        data = {"exit_code": code, "subtype": result.get("subtype"),
                "is_error": result.get("is_error"), "num_turns": result.get("num_turns"),
                "total_cost_usd": result.get("total_cost_usd"),
                "permission_denials": len(result.get("permission_denials") or [])}
        self.event("agent_finished", f"{self.opts.agent_kind} exited {code} "
                   f"({result.get('subtype', 'no result')})", data)
        self.exit_code = code if code != 0 or result.get("is_error") is not True else 1
        self.finish()

    def fail(self, message: str) -> None:
        self.error = message
        self.event("launcher_error", message.splitlines()[0], {"detail": message[-3000:]})
        self.exit_code = 1
        self.finish()

    def finish(self) -> None:
        """Stop both children (the server outlives the agent only until here)."""
        for proc in (self.agent, self.server):
            if proc is not None:
                stop_group(proc, self.opts.grace_s)
        self.phase = "done"


@contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT / SIGTERM raise Interrupted in the main thread for the duration."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def make_investigations(opts: LaunchOptions) -> list[Investigation]:
    """``opts.agents`` investigations (the claude executable is looked up only when used)."""
    claude = find_claude(opts.claude) if opts.agent_kind == "claude" else None
    return [Investigation(opts, claude, index=i) for i in range(opts.agents)]


def drive(runs: Sequence[Investigation], *, parallel: int | None = None, echo: bool = True,
          on_done: Callable[[Investigation], None] | None = None) -> Interrupted | None:
    """Drive ``runs`` to completion, at most ``parallel`` at once (default all), calling
    ``on_done`` as each ends; SIGINT / SIGTERM stop every child and are returned."""
    limit = len(runs) if parallel is None else max(1, parallel)
    pending, active = list(runs), []
    interrupted: Interrupted | None = None
    with _signals_raise():
        try:
            while pending or active:
                while pending and len(active) < limit:
                    inv = pending.pop(0)
                    inv.create()
                    if echo:
                        print(f"task {inv.task.id if inv.task else '?'}: {inv.path}",
                              file=sys.stderr)
                    inv.start_server()
                    active.append(inv)
                for inv in list(active):
                    if inv.phase == "serving":
                        inv.poll_server()
                    elif inv.phase == "running":
                        inv.poll_agent()
                    if inv.phase == "done":
                        active.remove(inv)
                        if on_done is not None:
                            on_done(inv)
                time.sleep(0.1)
        except Interrupted as sig:
            interrupted = sig
        finally:
            # a second signal during cleanup must not leave children behind: ignore it here
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, signal.SIG_IGN)
            for inv in runs:
                if inv.task is not None and inv.phase != "done":
                    if interrupted is not None:
                        inv.event("launcher_interrupted", f"received {interrupted}; stopping",
                                  {"signal": interrupted.signum})
                    inv.finish()
                    inv.exit_code = inv.exit_code if inv.exit_code is not None else 1
    return interrupted


def run_local(opts: LaunchOptions, *, echo: bool = True) -> int:
    """Run `opts.agents` independent investigations; 0 when every agent finished cleanly."""
    runs = make_investigations(opts)
    interrupted = drive(runs, echo=echo)
    if echo:
        for inv in runs:
            state = inv.error.splitlines()[0] if inv.error else f"exit {inv.exit_code}"
            print(f"{inv.path}: {state}", file=sys.stderr)
    if interrupted is not None:
        return 128 + interrupted.signum
    return 0 if all(inv.exit_code == 0 for inv in runs) else 1


def read_question(text: str) -> str:
    """The question itself, or the contents of ``@file``."""
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        if not path.is_file():
            raise LaunchError(f"question file not found: {path}")
        return path.read_text().strip()
    return text


def launch_argv(opts: LaunchOptions, question_file: Path) -> Sequence[str]:
    """The ``spd-mcp investigate`` command line that repeats this launch locally (for SLURM)."""
    argv = [sys.executable, "-m", "spd_mcp.cli", "investigate", opts.run, f"@{question_file}",
            "--agent", opts.agent, "--max-turns", str(opts.max_turns), "--model", opts.model,
            "--ready-timeout", f"{opts.ready_timeout_s:g}"]
    if opts.budget_usd is not None:
        argv += ["--budget-usd", f"{opts.budget_usd:g}"]
    if opts.root is not None:
        argv += ["--root", str(opts.root.resolve())]
    if opts.claude is not None and opts.agent_kind == "claude":
        argv += ["--claude", find_claude(opts.claude)]
    if opts.server_threads is not None:
        argv += ["--server-threads", str(opts.server_threads)]
    return argv
