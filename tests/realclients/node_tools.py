"""Install, once, the pinned Node clients the real-client tests drive (Claude Code, MCP Inspector).

They go into the project-local cache `<repo>/.cache/node/` (override: `SPD_MCP_NODE_CACHE`) with
`npm install --prefix`, under a file lock so parallel pytest workers never race. Install both up
front with `python -m tests.realclients.node_tools`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

CLAUDE_CODE_VERSION = "2.1.197"
INSPECTOR_VERSION = "0.15.0"
PACKAGES = (
    f"@anthropic-ai/claude-code@{CLAUDE_CODE_VERSION}",
    f"@modelcontextprotocol/inspector@{INSPECTOR_VERSION}",
)
REPO_ROOT = Path(__file__).resolve().parents[2]
NPM_TIMEOUT_S = 600


class NodeMissingError(RuntimeError):
    """`node` is not on PATH: the real-client tests cannot run here (they skip)."""


class NodeToolsInstallError(RuntimeError):
    """node is present but the pinned tools could not be installed or do not run (tests fail)."""


@dataclass(frozen=True)
class NodeTools:
    """Paths to the installed clients."""

    node: Path
    claude: Path  # the `claude` executable (a native binary)
    inspector_cli: Path  # the Inspector CLI entry script: run as `node <inspector_cli> ...`
    prefix: Path  # the npm prefix they were installed into


def cache_dir() -> Path:
    """The npm prefix the tools are installed into."""
    return Path(os.environ.get("SPD_MCP_NODE_CACHE") or REPO_ROOT / ".cache" / "node").resolve()


def find_node() -> Path:
    """The `node` executable, or NodeMissingError."""
    node = shutil.which("node")
    if node is None:
        raise NodeMissingError("node is not installed (needed for Claude Code and MCP Inspector)")
    return Path(node)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _paths(prefix: Path, node: Path) -> NodeTools:
    mods = prefix / "node_modules"
    return NodeTools(
        node=node,
        claude=mods / "@anthropic-ai" / "claude-code" / "bin" / "claude.exe",
        inspector_cli=mods / "@modelcontextprotocol" / "inspector" / "cli" / "build" / "index.js",
        prefix=prefix,
    )


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=NPM_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NodeToolsInstallError(f"{' '.join(cmd)} failed: {exc}") from exc


def _claude_version(claude: Path) -> str | None:
    if not claude.is_file():
        return None
    env = {**os.environ, "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1"}
    try:
        out = subprocess.run(
            [str(claude), "--version"], capture_output=True, text=True, timeout=60, env=env
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _healthy(tools: NodeTools) -> bool:
    version = _claude_version(tools.claude)
    return bool(version and CLAUDE_CODE_VERSION in version) and tools.inspector_cli.is_file()


def _install(tools: NodeTools) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise NodeToolsInstallError("node is installed but npm is not; cannot install the clients")
    tools.prefix.mkdir(parents=True, exist_ok=True)
    cmd = [
        npm,
        "install",
        "--prefix",
        str(tools.prefix),
        "--save-exact",
        "--no-audit",
        "--no-fund",
        "--loglevel=error",
        *PACKAGES,
    ]
    out = _run(cmd)
    if out.returncode != 0:
        raise NodeToolsInstallError(
            f"npm install failed (rc={out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        )
    if _claude_version(tools.claude) is None:
        # npm may skip install scripts; Claude Code's postinstall swaps in the native binary.
        _run([str(tools.node), "install.cjs"], cwd=tools.claude.parent.parent)
    if not _healthy(tools):
        raise NodeToolsInstallError(
            f"installed into {tools.prefix}, but `claude --version` does not report "
            f"{CLAUDE_CODE_VERSION} or the Inspector CLI ({tools.inspector_cli}) is missing"
        )


@cache
def ensure_node_tools() -> NodeTools:
    """Install the pinned clients if needed (idempotent, locked) and return their paths.

    Raises NodeMissingError without node, NodeToolsInstallError when installing fails.
    """
    node = find_node()
    prefix = cache_dir()
    tools = _paths(prefix, node)
    stamp = prefix / "installed.json"
    want = {"packages": list(PACKAGES)}
    with _locked(prefix.parent / f".{prefix.name}.lock"):
        current = json.loads(stamp.read_text()) if stamp.is_file() else None
        if current == want and _healthy(tools):
            return tools
        stamp.unlink(missing_ok=True)
        _install(tools)
        stamp.write_text(json.dumps(want))
    return tools


def require_node_tools() -> NodeTools:
    """ensure_node_tools() for tests: skip when node is absent, fail loudly on any other error."""
    import pytest

    try:
        return ensure_node_tools()
    except NodeMissingError as exc:
        pytest.skip(str(exc))


def main() -> int:
    """Install both clients and print their paths."""
    try:
        tools = ensure_node_tools()
    except NodeMissingError as exc:
        print(f"skipping the Node clients: {exc}", file=sys.stderr)
        return 0
    print(f"claude: {tools.claude}\ninspector cli: {tools.inspector_cli}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
