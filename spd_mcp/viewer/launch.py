"""Launching an investigation from the viewer: Claude Code through ``spd-mcp investigate`` when it
and an API key are available, otherwise the built-in scripted investigator (``spd-mcp demo``).

The child runs in its own session (it outlives the page and the viewer), writes its output to a
log file beside the task directories, and creates its task directory itself; the viewer reports
the new task's id once the directory appears.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from spd_mcp.investigation.taskdir import TaskDir, new_task_id

Mode = Literal["claude", "scripted"]
SCRIPTED_NOTICE = (
    "Claude Code or an Anthropic API key is not available here, so the built-in scripted "
    "investigator (`spd-mcp demo`, no LLM) was launched instead. It always follows its fixed "
    "pronoun-circuit plan; your question is recorded with the task. Install Claude Code and set "
    "ANTHROPIC_API_KEY to have an agent answer it."
)


class Launched(BaseModel):
    mode: Mode
    task_id: str | None
    notice: str | None
    log: str
    pid: int


def pick_mode(env: dict[str, str] | None = None) -> Mode:
    """``claude`` when a Claude Code executable and an API key are both present."""
    env = dict(os.environ) if env is None else env
    claude = env.get("SPD_MCP_CLAUDE") or shutil.which("claude", path=env.get("PATH"))
    has_key = bool(env.get("ANTHROPIC_API_KEY") or env.get("ANTHROPIC_AUTH_TOKEN"))
    return "claude" if claude and has_key else "scripted"


def launch_argv(mode: Mode, run: str, question_file: Path, root: Path) -> list[str]:
    """The command that runs one investigation of ``run`` into ``root``."""
    base = [sys.executable, "-m", "spd_mcp.cli"]
    if mode == "claude":
        return [*base, "investigate", run, f"@{question_file}", "--root", str(root)]
    return [*base, "demo", "--run", run, "--root", str(root), "--question", f"@{question_file}"]


def _task_dirs(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if TaskDir(p).exists()} if root.is_dir() else set()


def launch(
    run: str, question: str, root: Path, *, mode: Mode | None = None,
    argv: Sequence[str] | None = None, wait_s: float = 20.0,
) -> Launched:
    """Start an investigation in the background; wait up to ``wait_s`` for its task directory."""
    mode = mode or pick_mode()
    root.mkdir(parents=True, exist_ok=True)
    stamp = new_task_id()
    qfile = root / f".question-{stamp}.md"
    qfile.write_text(question)
    log = root / f".launch-{stamp}.log"
    before = _task_dirs(root)
    cmd = list(argv) if argv is not None else launch_argv(mode, run, qfile, root)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # A daemon thread reaps the child when it ends (no zombie, no unreaped-Popen warning).
    threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()
    task_id = None
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        new = sorted(_task_dirs(root) - before)
        if new:
            task_id = new[-1]
            break
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    return Launched(mode=mode, task_id=task_id, log=str(log), pid=proc.pid,
                    notice=SCRIPTED_NOTICE if mode == "scripted" else None)
