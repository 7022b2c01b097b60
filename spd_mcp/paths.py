"""Where things live, and the package version — torch-free, so the launcher and CLI stay light.

``$SPD_MCP_HOME`` (default ``~/.spd-mcp``) holds everything spd-mcp writes:

    runs/<name>/                 runs built here (a run may also live anywhere, or in the package)
    runs/<run_id>/app.db         the live app database of a run (prompts, graphs, edits, ...)
    runs/<run_id>/harvest/ attributions/ labels/   derived stages
    investigations/<task_id>/    task directories
    exports/<run name>/          baked edits
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

HOME_ENV = "SPD_MCP_HOME"


def spd_home() -> Path:
    """``$SPD_MCP_HOME``, or ``~/.spd-mcp``."""
    return Path(os.environ.get(HOME_ENV, Path.home() / ".spd-mcp"))


def runs_dir() -> Path:
    """Runs built here, referred to by name."""
    return spd_home() / "runs"


def shipped_runs_dir() -> Path:
    """Runs shipped inside the package (read-only)."""
    return Path(str(resources.files("spd_mcp") / "model" / "zoo" / "runs"))


def run_data_dir(run_id: str) -> Path:
    """Derived data of one run (its run directory may be read-only)."""
    return spd_home() / "runs" / run_id


def app_db_path(run_id: str) -> Path:
    """The run's live app database (the one ``spd-mcp serve``, the CLI and the viewer share)."""
    return run_data_dir(run_id) / "app.db"


def investigations_root() -> Path:
    """Where task directories go unless told otherwise."""
    return spd_home() / "investigations"


def exports_dir(run_name: str) -> Path:
    """Where exported (baked) edits of a run go."""
    return spd_home() / "exports" / run_name


def package_version() -> str:
    """The installed spd-mcp version (``"unknown"`` when running from an uninstalled tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spd-mcp")
    except PackageNotFoundError:
        return "unknown"
