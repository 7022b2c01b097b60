"""MCP plumbing shared by the tool families: the app state from the lifespan, progress
notifications, and strict registration — where domain errors become ``ToolError`` (one place)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Annotated, Any

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools.base import Tool
from mcp_types import ToolAnnotations
from pydantic import ConfigDict, Field

from spd_mcp.errors import InputError
from spd_mcp.service.executor import Busy
from spd_mcp.service.state import AppState

TextArg = Annotated[str | None, Field(description="prompt text (or give prompt_id)")]
PromptIdArg = Annotated[int | None, Field(description="a stored prompt's id (or give text)")]
NodesArg = Annotated[list[str], Field(max_length=4096, description=(
    "node keys 'LAYER:POS:C' or patterns: '*' for any part ('1.attn.v:5:*', '*:5:*', "
    "'LAYER:*'), an '@alive' suffix (natural CI > 0 here), or 'alive'"))]
ComponentsArg = Annotated[list[str], Field(min_length=1, max_length=4096, description=(
    "component keys 'LAYER:C' or patterns 'LAYER:*', '*:*' (optionally '@alive'), 'alive'"))]
LabelArg = Annotated[str | None, Field(description="token whose probability to report")]
ContrastArg = Annotated[str | None, Field(
    description="second token: also report logit(label) - logit(contrast)")]
ControlsArg = Annotated[int, Field(
    ge=0, le=50, description="random same-size alive sets (per layer and position) run the "
    "same way; their spread is reported")]

EXPECTED_ERRORS = (InputError, Busy)
"""Errors the model reads and can act on (bad input; a full compute queue)."""


def state(ctx: Context) -> AppState:
    return ctx.request_context.lifespan_context  # type: ignore[no-any-return]


class Progress:
    """Thread-safe progress reporter: the compute worker calls it, the event loop sends it."""

    def __init__(self, ctx: Context, message: str) -> None:
        self.ctx, self.message = ctx, message
        self.loop = asyncio.get_running_loop()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < 0.2:
            return
        self._last = now
        asyncio.run_coroutine_threadsafe(
            self.ctx.report_progress(done, total, self.message), self.loop
        )


READ_ONLY = ToolAnnotations(readOnlyHint=True, destructiveHint=False, idempotentHint=True,
                            openWorldHint=False)
STORES = ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=True,
                         openWorldHint=False)


def _readable_errors(fn: Callable[..., Any], is_async: bool) -> Callable[..., Any]:
    """``fn`` with expected domain errors re-raised as ToolErrors (their text reaches the model;
    any other exception stays a server-side bug)."""
    if is_async:
        @functools.wraps(fn)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except EXPECTED_ERRORS as e:
                raise ToolError(str(e)) from None

        return run_async

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EXPECTED_ERRORS as e:
            raise ToolError(str(e)) from None

    return run


def compact_schema(schema: Any) -> Any:
    """A JSON schema without what an agent need not read: pydantic's generated titles,
    ``anyOf [X, null]`` (an optional argument is simply omitted) and ``default: null``."""
    if isinstance(schema, list):
        return [compact_schema(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for k, v in schema.items():
        if k == "title":
            continue
        if k in ("properties", "$defs"):
            out[k] = {name: compact_schema(sub) for name, sub in v.items()}
        else:
            out[k] = compact_schema(v)
    options = out.get("anyOf")
    if isinstance(options, list):
        rest = [o for o in options if o != {"type": "null"}]
        if len(rest) == 1 and len(rest) < len(options):
            del out["anyOf"]
            out = {**rest[0], **out}
    if "default" in out and out["default"] is None:
        del out["default"]
    return out


def strict_tool(fn: Callable[..., Any], annotations: ToolAnnotations, title: str) -> Tool:
    """A Tool whose argument model rejects unknown keys (a typo must not pass silently) and
    whose expected errors reach the model as readable ``isError`` results."""
    tool = Tool.from_function(fn, annotations=annotations, title=title, structured_output=True)
    base = tool.fn_metadata.arg_model
    strict = type(base.__name__, (base,), {
        "model_config": ConfigDict(**{**base.model_config, "extra": "forbid"}),
        "__module__": base.__module__,
    })
    tool.fn_metadata.arg_model = strict
    tool.parameters = compact_schema(strict.model_json_schema(by_alias=True))
    tool.fn = _readable_errors(tool.fn, tool.is_async)
    return tool
