"""The application state one served run needs, built once and shared by every request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from spd_mcp.analysis.dataset import DatasetIndex
from spd_mcp.attributions.store import Attributions, load_attributions
from spd_mcp.editing.book import EditBook
from spd_mcp.harvest.store import Harvest, load_harvest
from spd_mcp.model.session import RunSession
from spd_mcp.model.validity import Validity
from spd_mcp.paths import app_db_path

from .executor import ComputeExecutor
from .store import AppStore

if TYPE_CHECKING:
    from .jobs import JobBook

T = TypeVar("T")
ProgressFn = Callable[[int, int], None]
"""``progress(done, total)``, called from the compute worker (MCP notifications or the viewer)."""
DATASET_DOCS = 2000
"""Documents of the training stream indexed for ``search_dataset``."""


@dataclass
class AppState:
    """A loaded run with its app database and compute executor; derived stages on first use."""

    session: RunSession
    executor: ComputeExecutor
    store: AppStore
    auto_prepare: bool = True
    """Build a missing harvest / attributions stage on first use (default settings)."""
    _dataset: DatasetIndex | None = None
    _dataset_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _harvest: Harvest | None = None
    _attributions: Attributions | None = None
    _edits: EditBook | None = None
    _validity: Validity | None = None
    jobs: JobBook | None = None
    """The background jobs of long calls (opened by the server, see :mod:`.jobs`)."""
    validity_noted: bool = False
    """Whether a result already carried the full validity caution (later ones get it short)."""

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


COMPUTING: ContextVar[Callable[[str | None], None] | None] = ContextVar("spd_computing",
                                                                        default=None)
"""Told the name of each :func:`compute` call a task awaits (then None when it returns): how a
background job (:mod:`.jobs`) knows it has passed validation and reached its heavy stage."""


async def compute(st: AppState, name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the compute worker (FIFO; ``Busy`` when the queue is full). A
    :class:`~.worker.Call` runs in the worker process when the executor has one."""
    note = COMPUTING.get()
    if note is not None:
        note(name)
    try:
        return await st.executor.run(name, fn)
    finally:
        if note is not None:
            note(None)


async def open_state(
    session: RunSession, executor: ComputeExecutor, *, db_path: Path | None = None,
    auto_prepare: bool = True,
) -> AppState:
    """An AppState over the run's app database (``db_path``, default the run's own); the
    executor then also holds the machine-wide lock of the run's device around each job."""
    executor.use_device(str(session.device))
    store = await AppStore.open(db_path or app_db_path(session.run_id))
    return AppState(session=session, executor=executor, store=store, auto_prepare=auto_prepare)


@asynccontextmanager
async def app_store(session: RunSession) -> AsyncIterator[AppStore]:
    """The run's app database, opened for one block (CLI commands)."""
    store = await AppStore.open(app_db_path(session.run_id))
    try:
        yield store
    finally:
        await store.close()
