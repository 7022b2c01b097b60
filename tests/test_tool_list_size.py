"""The tool list an agent reads (what Claude Code sends the model for each tool: name, description
and input schema) stays compact: one budget for the whole catalogue, no pydantic titles, and
descriptions without docstring indentation."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from spd_mcp.model.session import RunSession
from spd_mcp.server import build_server

BUDGET = 33_980
"""Characters of ``json.dumps({name, description, input_schema})`` summed over ``tools/list``
(41,494 before the tool list was compacted). About 17,900 of them are names and schema structure
(property names, types, defaults, bounds, enums) that no wording can remove. Raised from 33,500
by 480 for get_job (background jobs: long calls answer with a handle the agent polls); the job
tools' handle lives in their output schemas, which this budget does not count."""


def tool_list(tmp_path: Path) -> list[Any]:
    async def main() -> list[Any]:
        server = build_server(session=RunSession.load("tales"), db_path=tmp_path / "app.db",
                              auto_prepare=False)
        async with Client(server) as client:
            return list((await client.list_tools()).tools)

    return asyncio.run(main())


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    return tool_list(tmp_path_factory.mktemp("toolsize"))


def size(tool: Any) -> int:
    return len(json.dumps({"name": tool.name, "description": tool.description,
                           "input_schema": tool.input_schema}))


def test_tool_list_fits_the_budget(tools: list[Any]) -> None:
    sizes = sorted(((size(t), t.name) for t in tools), reverse=True)
    total = sum(n for n, _ in sizes)
    table = "\n".join(f"{n:6d} {name}" for n, name in sizes)
    assert total <= BUDGET, f"tool list is {total} characters (budget {BUDGET}):\n{table}"


def _schemas(schema: Any) -> list[dict[str, Any]]:
    """Every (sub)schema under ``schema``: properties, items, anyOf members, $defs."""
    if not isinstance(schema, dict):
        return []
    out = [schema]
    for name, sub in schema.items():
        if name in ("properties", "$defs"):
            for s in sub.values():
                out += _schemas(s)
        elif name in ("items", "additionalProperties"):
            out += _schemas(sub)
        elif name in ("anyOf", "oneOf", "allOf"):
            for s in sub:
                out += _schemas(s)
    return out


def test_schemas_have_no_titles_and_descriptions_are_single_spaced(tools: list[Any]) -> None:
    for t in tools:
        texts = [("description", t.description or "")]
        for s in _schemas(t.input_schema):
            assert "title" not in s, (t.name, s)
            if isinstance(s.get("description"), str):
                texts.append(("argument description", s["description"]))
        for what, text in texts:
            assert not re.search(r" {2,}|\n[ \t]|\s$|^\s", text), (t.name, what, text)
