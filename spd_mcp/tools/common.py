"""MCP plumbing shared by the tool families: the app state from the lifespan, progress
notifications, strict registration — where domain errors become ``ToolError`` (one place) — and
long calls answered with a background-job handle (:func:`as_job`, :func:`job_tool`)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import re
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar, get_args, get_type_hints

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools.base import Tool
from mcp.server.mcpserver.utilities.func_metadata import FuncMetadata
from mcp_types import ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field

from spd_mcp.errors import InputError
from spd_mcp.service.executor import Busy
from spd_mcp.service.jobs import Job, JobInfo, job_book
from spd_mcp.service.state import AppState, ProgressFn

# Shared arguments: one terse description each (the tool's docstring says the rest). Arguments
# whose name says it all (seed, top_k, limit, offset) carry only their bounds.
TextArg = str | None
PromptIdArg = Annotated[int | None, Field(description="from create_prompt, instead of text")]
ComponentArg = Annotated[str, Field(description="'LAYER:C'")]
NodesArg = Annotated[list[str], Field(max_length=4096, description=(
    "keys 'LAYER:POS:C' or patterns: '*' for a part ('*:5:*', 'LAYER:*'), suffix '@alive' "
    "(natural CI > 0), or 'alive'"))]
ComponentsArg = Annotated[list[str], Field(min_length=1, max_length=4096, description=(
    "keys 'LAYER:C' or patterns 'LAYER:*', '*:*', '@alive', 'alive'"))]
LabelArg = Annotated[str | None, Field(description="token whose probability to report")]
ContrastArg = Annotated[str | None, Field(
    description="also report logit(label) - logit(contrast)")]
ControlsArg = Annotated[int, Field(
    ge=0, le=50, description="random same-size alive sets (per layer, position) as controls")]
PositionArg = Annotated[int, Field(description="-1 = last")]
LayersArg = Annotated[list[str] | None, Field(description="canonical layer names; default all")]
EditArg = Annotated[int | None, Field(description="an edit id to apply")]
GraphIdArg = Annotated[int, Field(description="from compute_graph / optimize_graph")]


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


SIZE_CAP = 32
"""``maxItems`` / ``maxLength`` above this are safety caps an agent never meets: validated by the
argument model, not advertised."""


def one_line(text: str | None) -> str:
    """A docstring or description as the agent reads it: dedented, each paragraph on one line,
    runs of spaces collapsed."""
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(text or ""))
    return "\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def compact_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema without what an agent need not read: pydantic's generated titles,
    ``anyOf [X, null]`` (an optional argument is simply omitted), ``default: null``, ``$defs``
    (inlined where used, unless recursive), nested ``additionalProperties: false`` (the argument
    model still rejects unknown keys) and safety-cap lengths; descriptions made single-line."""
    defs = schema.get("$defs", {})
    recursive: list[str] = []
    out: dict[str, Any] = _compact(schema, defs, frozenset(), recursive, top=True)
    if recursive:  # a self-referencing model stays a reference
        out["$defs"] = {n: _compact(d, defs, frozenset({n}), [], top=False)
                        for n, d in defs.items()}
    return out


def _hidden(k: str, v: Any, top: bool) -> bool:
    """Whether schema keyword ``k`` (value ``v``) is left out of the advertised schema."""
    return (k in ("title", "$defs") or (k == "additionalProperties" and v is False and not top)
            or (k in ("maxItems", "maxLength") and isinstance(v, int) and v > SIZE_CAP))


def _compact(schema: Any, defs: dict[str, Any], inlining: frozenset[str], recursive: list[str],
             top: bool = False) -> Any:
    if isinstance(schema, list):
        return [_compact(x, defs, inlining, recursive) for x in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    name = ref[len("#/$defs/"):] if isinstance(ref, str) and ref.startswith("#/$defs/") else None
    if name in defs and name not in inlining:
        schema = {**defs[name], **{k: v for k, v in schema.items() if k != "$ref"}}
        inlining = inlining | {name}
    elif name is not None:
        recursive.append(name)
    out: dict[str, Any] = {}
    for k, v in schema.items():
        if _hidden(k, v, top):
            continue
        if k == "properties":
            out[k] = {p: _compact(sub, defs, inlining, recursive) for p, sub in v.items()}
        elif k == "description" and isinstance(v, str):
            out[k] = one_line(v)
        else:
            out[k] = _compact(v, defs, inlining, recursive)
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
    tool.description = one_line(tool.description)
    tool.fn = _readable_errors(tool.fn, tool.is_async)
    return tool


# ----------------------------------------------------------------------------- background jobs
R = TypeVar("R", bound=BaseModel)


class Pending(BaseModel):
    """The answer of a call that became a background job (instead of its result)."""

    job: JobInfo


async def as_job(
    ctx: Context, tool: str, work: Callable[[ProgressFn], Coroutine[Any, Any, R]], *,
    stages: set[str], unit: str, message: str,
) -> R | Pending:
    """``work(progress)``'s result, or — when it runs past the server's job limit — a handle
    the agent polls with ``get_job`` while it keeps running. ``stages``: the heavy compute calls
    (after validation) at which it may become a job; ``unit``: what its progress counts;
    ``message``: its MCP progress notifications' text (sent while this call waits)."""
    book = job_book(state(ctx))
    out = await book.run(tool, work, stages=stages, unit=unit, progress=Progress(ctx, message))
    return Pending(job=book.info(out, with_result=False)) if isinstance(out, Job) else out


def job_tool(fn: Callable[..., Any], annotations: ToolAnnotations, title: str) -> Tool:
    """:func:`strict_tool` for a function returning ``Result | Pending``: its output schema is
    the result's with one more property, ``job``, and either the result's required fields or
    ``job`` required (so a handle passes clients that check structured content)."""
    tool = strict_tool(fn, annotations, title)
    ret = get_type_hints(fn)["return"]
    (result,) = [a for a in get_args(ret) if a is not Pending]
    meta = tool.fn_metadata
    schema = dict(FuncMetadata(arg_model=meta.arg_model, output_model=result).output_schema or {})
    schema["properties"] = {**schema.get("properties", {}), "job": {
        **compact_schema(JobInfo.model_json_schema()),
        "description": "instead of the result when the call became a background job"}}
    required = schema.pop("required", None)
    if required:
        schema["anyOf"] = [{"required": required}, {"required": ["job"]}]
    meta.output_schema, meta.output_model, meta.wrap_output = schema, ret, False
    return tool
