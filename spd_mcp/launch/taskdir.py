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

from spd_mcp.files import write_json_atomic
from spd_mcp.paths import investigations_root, package_version


class TaskHandle(Protocol):
    """What the launcher uses of a task directory."""

    @property
    def path(self) -> Path: ...

    @property
    def id(self) -> str: ...

    def append_event(
        self, source: str, type: str, message: str, data: Mapping[str, Any] | None = None
    ) -> Any: ...


def default_root() -> Path:
    return investigations_root()


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
    write_json_atomic(file, info)
