"""Placeholder: the attention tool family (being built)."""

from __future__ import annotations

from mcp.server.mcpserver.tools.base import Tool


def tools() -> list[Tool]:
    return []
