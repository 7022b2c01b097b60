"""What the launcher needs of the task-directory layer (``spd_mcp.investigation``): create a
task, append events, list tasks, the methodology text, and launcher facts in ``task.json``."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol


class TaskHandle(Protocol):
    """What the launcher uses of a task directory."""

    @property
    def path(self) -> Path: ...

    @property
    def id(self) -> str: ...

    def append_event(
        self, source: str, type: str, message: str, data: Mapping[str, Any] | None = None
    ) -> Any: ...


def spd_home() -> Path:
    """``$SPD_MCP_HOME`` (``~/.spd-mcp``), as ``spd_mcp.model.run_io`` has it, without torch."""
    return Path(os.environ.get("SPD_MCP_HOME", Path.home() / ".spd-mcp"))


def default_root() -> Path:
    return spd_home() / "investigations"


def create_task(run: str, question: str, *, root: Path | None = None, model: str | None = None,
                max_turns: int | None = None,
                launcher: Mapping[str, Any] | None = None) -> TaskHandle:
    """A new task directory (``spd_mcp.investigation``)."""
    from spd_mcp.investigation import taskdir

    return taskdir.create_task(run, question, root=root, model=model, max_turns=max_turns,
                               launcher=dict(launcher or {}))


def list_task_paths(root: Path | None = None) -> list[Path]:
    """Task directories under `root` (those with a task.json)."""
    from spd_mcp.investigation import taskdir

    return [Path(getattr(t, "path", t)) for t in taskdir.list_tasks(root or default_root())]


def methodology(model_info: str) -> str:
    """The system-prompt addendum for the agent."""
    from spd_mcp.investigation.methodology import methodology_text

    return methodology_text(model_info)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spd-mcp")
    except PackageNotFoundError:
        return "0"


def launcher_facts(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Where and how the launcher ran: python, package version, host, pid, SLURM ids."""
    facts: dict[str, Any] = {
        "python": sys.executable, "version": package_version(), "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    for env, key in (("SLURM_JOB_ID", "slurm_job_id"), ("SLURM_ARRAY_JOB_ID", "slurm_array_job_id"),
                     ("SLURM_ARRAY_TASK_ID", "slurm_array_task_id")):
        if os.environ.get(env):
            facts[key] = os.environ[env]
    facts.update(extra or {})
    return facts


def update_task_json(path: Path, **launcher: Any) -> None:
    """Merge `launcher` into task.json's ``launcher`` object (atomic replace)."""
    file = path / "task.json"
    info = json.loads(file.read_text())
    merged = dict(info.get("launcher") or {})
    merged.update(launcher)
    info["launcher"] = merged
    tmp = file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, file)
