"""spd-mcp: an MCP-server-first toolkit for agentic interpretability of SPD decompositions."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spd_mcp.api import Run


def load_run(ref: str, *, device: str = "cpu") -> Run:
    """Load a run (path or name) with the analyses the MCP tools expose (see ``spd_mcp.api``)."""
    from spd_mcp.api import Run

    return Run.load(ref, device=device)
