"""Stored LLM labels of a run's components (read-only here; ``spd-mcp label`` writes them)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from spd_mcp.interp.store import LabelRow, LabelStore, labels_path

from .state import AppState

T = TypeVar("T")


def _read_labels(st: AppState, fn: Callable[[LabelStore], T], empty: T) -> T:
    path = labels_path(st.session.run_id)
    if not path.exists():
        return empty
    with LabelStore(path) as store:
        return fn(store)


async def best_labels(st: AppState) -> dict[str, LabelRow]:
    """Component key → its best stored label row (empty when the run has no labels)."""
    return await asyncio.to_thread(_read_labels, st, lambda s: s.best_labels(), {})


async def search_labels(st: AppState, text: str, limit: int) -> list[Any]:
    return await asyncio.to_thread(_read_labels, st, lambda s: s.search(text, limit), [])
