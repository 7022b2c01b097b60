"""Every example in examples/ runs and passes its own checks (each asserts what it prints)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.realclients.clients import claude_env, claude_mcp_list
from tests.realclients.node_tools import NodeTools, require_node_tools

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return done


def test_every_example_is_tested() -> None:
    tested = {"python_api.py", "scripted_calls.py", "claude_mcp_add.sh", ".mcp.json"}
    assert {p.name for p in EXAMPLES.iterdir() if p.is_file()} == tested


@pytest.mark.parametrize("name", ["python_api.py", "scripted_calls.py"])
def test_python_example(name: str, tmp_path: Path) -> None:
    env = {**os.environ, "SPD_MCP_HOME": str(tmp_path / "home"), "SPD_MCP_THREADS": "1",
           "OMP_NUM_THREADS": "1"}
    extra = ["--job-after", "0"] if name == "scripted_calls.py" else []  # follows job handles
    out = _run([sys.executable, str(EXAMPLES / name), *extra], env, tmp_path).stdout
    assert out.rstrip().endswith("ok"), out
    if extra:
        assert "optimize_graph: job 1 running" in out, out


def _path_with_claude(tools: NodeTools, tmp_path: Path) -> str:
    """PATH with `claude` (the pinned Claude Code) and this venv's `spd-mcp` first."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "claude").symlink_to(tools.claude)
    venv_bin = Path(sys.executable).parent
    return os.pathsep.join([str(bin_dir), str(venv_bin), os.environ["PATH"]])


def test_claude_mcp_add_example(tmp_path: Path) -> None:
    tools = require_node_tools()
    env = claude_env(tmp_path, extra={"SPD_MCP_HOME": str(tmp_path / "home"),
                                      "PATH": _path_with_claude(tools, tmp_path)})
    out = _run(["sh", str(EXAMPLES / "claude_mcp_add.sh")], env, tmp_path).stdout
    assert "✔ Connected" in out, out


def test_project_mcp_json_example(tmp_path: Path) -> None:
    """examples/.mcp.json, as a project's .mcp.json, connects (once project servers are
    approved in the user's settings)."""
    tools = require_node_tools()
    shutil.copy(EXAMPLES / ".mcp.json", tmp_path / ".mcp.json")
    (tmp_path / ".claude").mkdir()
    (tmp_path / ".claude" / "settings.json").write_text(
        json.dumps({"enableAllProjectMcpServers": True}))
    listed = claude_mcp_list(tmp_path, tools=tools, env={
        "SPD_MCP_HOME": str(tmp_path / "home"), "PATH": _path_with_claude(tools, tmp_path)})
    assert listed.status.get("spd") == "✔ Connected", listed.stdout
