"""Every example in examples/ runs and passes its own checks (each asserts what it prints)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.realclients.clients import claude_env
from tests.realclients.node_tools import require_node_tools

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return done


def test_every_example_is_tested() -> None:
    tested = {"python_api.py", "scripted_calls.py", "claude_mcp_add.sh"}
    assert {p.name for p in EXAMPLES.iterdir() if p.is_file()} == tested


@pytest.mark.parametrize("name", ["python_api.py", "scripted_calls.py"])
def test_python_example(name: str, tmp_path: Path) -> None:
    env = {**os.environ, "SPD_MCP_HOME": str(tmp_path / "home"), "SPD_MCP_THREADS": "1",
           "OMP_NUM_THREADS": "1"}
    out = _run([sys.executable, str(EXAMPLES / name)], env, tmp_path).stdout
    assert out.rstrip().endswith("ok"), out


def test_claude_mcp_add_example(tmp_path: Path) -> None:
    tools = require_node_tools()
    venv_bin = Path(sys.executable).parent
    env = claude_env(tmp_path, extra={"SPD_MCP_HOME": str(tmp_path / "home")})
    env["PATH"] = os.pathsep.join([str(Path(tools.claude).parent), str(venv_bin), env["PATH"]])
    out = _run(["sh", str(EXAMPLES / "claude_mcp_add.sh")], env, tmp_path).stdout
    assert "✔ Connected" in out, out
