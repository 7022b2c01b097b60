"""Shared plumbing for tool adapters: app state, strict registration, errors, compute, progress."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools.base import Tool
from mcp_types import ToolAnnotations
from pydantic import ConfigDict

from spd_mcp.analysis.dataset import DatasetIndex
from spd_mcp.analysis.session import AnalysisError, RunSession
from spd_mcp.attributions.config import AttributionError
from spd_mcp.attributions.store import Attributions, load_attributions
from spd_mcp.edit_store import EditBook
from spd_mcp.executor import Busy, ComputeExecutor
from spd_mcp.harvest.config import HarvestError
from spd_mcp.harvest.store import Harvest, load_harvest
from spd_mcp.keys import BadKeyError
from spd_mcp.store import AppStore

T = TypeVar("T")
INPUT_ERRORS = (AnalysisError, BadKeyError, HarvestError, AttributionError)

MAX_TEXT_CHARS = 4000
DATASET_DOCS = 2000


@dataclass
class AppState:
    """What the lifespan builds once and every tool shares."""

    session: RunSession
    executor: ComputeExecutor
    store: AppStore
    _dataset: DatasetIndex | None = None
    _dataset_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    auto_prepare: bool = True
    """Build a missing harvest / attributions stage on first use (default settings)."""
    _harvest: Harvest | None = None
    _attributions: Attributions | None = None
    _edits: EditBook | None = None

    @property
    def edits(self) -> EditBook:
        """The run's stored edits (with the cache of loaded ones)."""
        if self._edits is None:
            self._edits = EditBook(self.store, self.session)
        return self._edits

    async def attributions(self) -> Attributions | None:
        """The newest finished dataset attributions of the run (looked up until one exists)."""
        if self._attributions is None:
            self._attributions = await asyncio.to_thread(
                load_attributions, self.session, missing_ok=True
            )
        return self._attributions

    async def harvest(self) -> Harvest | None:
        """The newest finished harvest of the run (looked up again until one exists)."""
        if self._harvest is None:
            self._harvest = await asyncio.to_thread(load_harvest, self.session, missing_ok=True)
        return self._harvest

    async def dataset(self) -> DatasetIndex:
        """The dataset index, built on first use off the event loop (not on the compute worker:
        it only tokenises text)."""
        async with self._dataset_lock:
            if self._dataset is None:
                self._dataset = await asyncio.to_thread(
                    DatasetIndex.build, self.session, DATASET_DOCS
                )
            return self._dataset


def state(ctx: Context) -> AppState:
    return ctx.request_context.lifespan_context  # type: ignore[no-any-return]


def fail(message: str) -> ToolError:
    return ToolError(message)


def check_text(text: str, name: str = "text") -> str:
    if not isinstance(text, str) or not text.strip():
        raise fail(f"{name} is empty; give at least one word")
    if len(text) > MAX_TEXT_CHARS:
        raise fail(f"{name} has {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    return text


async def resolve_prompt(
    st: AppState, text: str | None, prompt_id: int | None
) -> tuple[list[int], int]:
    """Token ids and stored prompt id from exactly one of ``text`` / ``prompt_id``."""
    if (text is None) == (prompt_id is None):
        raise fail("give exactly one of text or prompt_id")
    if prompt_id is not None:
        found = await st.store.get_prompt(prompt_id)
        if found is None:
            n = await st.store.count_prompts()
            raise fail(f"prompt_id {prompt_id} does not exist ({n} prompts stored; "
                       "create one with create_prompt)")
        return found[0], prompt_id
    assert text is not None
    check_text(text)
    try:
        ids = st.session.encode(text)
    except AnalysisError as e:
        raise fail(f"text: {e}") from None
    return ids, await st.store.get_or_create_prompt(ids, text)


def check_position(pos: int | None, n: int, name: str = "position") -> int:
    if pos is None:
        return n - 1
    if not -n <= pos < n:
        raise fail(f"{name} {pos} out of range (prompt has {n} tokens: 0..{n - 1}, or -1 for last)")
    return pos % n


class Progress:
    """Thread-safe progress reporter: the compute worker calls it, the event loop sends it."""

    def __init__(self, ctx: Context, loop: asyncio.AbstractEventLoop, message: str) -> None:
        self.ctx, self.loop, self.message = ctx, loop, message
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < 0.2:
            return
        self._last = now
        asyncio.run_coroutine_threadsafe(
            self.ctx.report_progress(done, total, self.message), self.loop
        )


ProgressFn = Callable[[int, int], None]
"""``progress(done, total)``, called from the compute worker (MCP notifications or the viewer)."""


async def compute(ctx: Context, name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the compute worker; turn input errors and overload into ToolErrors."""
    return await compute_on(state(ctx), name, fn)


async def compute_on(st: AppState, name: str, fn: Callable[[], T]) -> T:
    """:func:`compute` for callers without an MCP context (the viewer)."""
    try:
        return await st.executor.run(name, fn)
    except Busy as e:
        raise fail(str(e)) from None
    except INPUT_ERRORS as e:
        raise fail(str(e)) from None


def guard(fn: Callable[[], T]) -> T:
    """Run a cheap synchronous step, mapping input errors to ToolErrors."""
    try:
        return fn()
    except INPUT_ERRORS as e:
        raise fail(str(e)) from None


READ_ONLY = ToolAnnotations(readOnlyHint=True, destructiveHint=False, idempotentHint=True,
                            openWorldHint=False)
STORES = ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=True,
                         openWorldHint=False)


def strict_tool(fn: Callable[..., Any], annotations: ToolAnnotations, title: str) -> Tool:
    """A Tool whose argument model rejects unknown keys (a typo must not pass silently)."""
    tool = Tool.from_function(fn, annotations=annotations, title=title, structured_output=True)
    base = tool.fn_metadata.arg_model
    strict = type(base.__name__, (base,), {
        "model_config": ConfigDict(**{**base.model_config, "extra": "forbid"}),
        "__module__": base.__module__,
    })
    tool.fn_metadata.arg_model = strict
    tool.parameters = strict.model_json_schema(by_alias=True)
    return tool


def _can_prepare(st: AppState) -> bool:
    entry = st.session.run.target.entry
    return st.auto_prepare and getattr(entry, "dataset_text", None) is not None


async def ensure_harvest(ctx: Context) -> Harvest:
    """The run's harvest; built on first use (default settings, progress notifications)."""
    from spd_mcp.harvest.runner import harvest

    st = state(ctx)
    h = await st.harvest()
    if h is None and _can_prepare(st):
        progress = Progress(ctx, asyncio.get_running_loop(), "building the harvest (first use)")
        await compute(ctx, "harvest", lambda: harvest(st.session, progress=progress))
        h = await st.harvest()
    if h is None:
        name = st.session.run.name
        raise fail(f"no harvest for run {name!r}: build one with `spd-mcp prepare {name}` or "
                   f"`spd-mcp harvest {name}` (about 15 s on one CPU core for tales)")
    return h


async def ensure_attributions(ctx: Context) -> Attributions:
    """The run's dataset attributions; built on first use (default settings, progress)."""
    from spd_mcp.attributions.runner import compute_attributions

    st = state(ctx)
    a = await st.attributions()
    if a is None and _can_prepare(st):
        progress = Progress(ctx, asyncio.get_running_loop(), "building dataset attributions")
        await compute(ctx, "attributions",
                      lambda: compute_attributions(st.session, progress=progress))
        a = await st.attributions()
    if a is None:
        name = st.session.run.name
        raise fail(f"no dataset attributions for run {name!r}: build them with `spd-mcp prepare "
                   f"{name}` or `spd-mcp attributions {name}` (about 40 s on one CPU core for "
                   "tales)")
    return a


def _run_id(st: AppState) -> str:
    return str(st.session.run.meta.get("run_id", st.session.run.name))


def _read_labels(st: AppState, fn: Callable[[Any], T], empty: T) -> T:
    from spd_mcp.interp.store import LabelStore, labels_path

    path = labels_path(_run_id(st))
    if not path.exists():
        return empty
    with LabelStore(path) as store:
        return fn(store)


async def best_labels(st: AppState) -> dict[str, Any]:
    """Component key → its best stored label row (empty when the run has no labels)."""
    return await asyncio.to_thread(_read_labels, st, lambda s: s.best_labels(), {})


async def search_labels(st: AppState, text: str, limit: int) -> list[Any]:
    return await asyncio.to_thread(_read_labels, st, lambda s: s.search(text, limit), [])
