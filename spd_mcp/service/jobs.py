"""Background jobs: a long call keeps running after its caller has been answered with a handle.

A face runs a heavy operation through :meth:`JobBook.run`. The call waits up to the book's limit
(``after_s``); an operation done by then returns its result as usual. Otherwise the caller gets
the :class:`Job` (a handle with an id) while the operation keeps running as an asyncio task, and
its outcome — the result, or the error — is kept for :meth:`JobBook.wait` to hand out later.

Bad input still fails at once: an operation is only handed back as a job once it is *committed*,
i.e. awaiting :func:`~.state.compute` for one of its heavy stages (``"harvest"``,
``"compute_graph"``, ...; ``compute`` tells the job through :data:`~.state.COMPUTING`).
Service operations validate their arguments before that call, so an error raised before it
reaches the caller directly. (A job that has not committed within
``COMMIT_GRACE_S`` after the limit — e.g. a cheap preliminary computation queued behind someone
else's long job — is handed back anyway.) The heavy work itself runs on the compute executor as
before; the event loop only awaits it.

The book belongs to one app state (:func:`job_book`); :meth:`JobBook.close` cancels running jobs
(a queued computation is withdrawn, one already running on the worker ends on its own).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from spd_mcp.errors import InputError, SpdMcpError

from .executor import Busy, ComputeExecutor
from .state import COMPUTING, AppState, ProgressFn

log = logging.getLogger("spd_mcp.jobs")

T = TypeVar("T")
Status = Literal["queued", "running", "done", "failed", "cancelled"]

DEFAULT_AFTER_S = 20.0
"""Seconds a call waits before it becomes a job (clients commonly time out after 60 s)."""
AFTER_ENV = "SPD_MCP_JOB_AFTER_S"
COMMIT_GRACE_S = 10.0
"""How much longer than the limit a call waits for its operation to reach its heavy stage."""
KEEP_FINISHED = 32
"""Finished jobs kept with their outcome (the oldest finished is dropped first)."""
MAX_WAIT_S = 60.0
"""The longest ``get_job`` blocks for completion."""
_POLL_S = 0.05


def after_s_from_env(value: float | None = None) -> float:
    """The limit: ``value`` if given, else ``$SPD_MCP_JOB_AFTER_S``, else the default."""
    import os

    if value is None:
        raw = os.environ.get(AFTER_ENV, "").strip()
        if not raw:
            return DEFAULT_AFTER_S
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{AFTER_ENV}={raw!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"the job limit must be a number of seconds >= 0 (0 = always a job), "
                         f"got {value}")
    return value


class JobInfo(BaseModel):
    """Where a background job stands (flat: one level, so it reads at a glance)."""

    job_id: int
    tool: str
    status: Status = Field(description="queued: waiting for the compute worker")
    stage: str | None = Field(None, description="the computation it is in")
    done: int | None = None
    total: int | None = None
    unit: str | None = Field(None, description="what done / total count")
    elapsed_s: float
    eta_s: float | None = Field(None, description="estimated seconds left in this stage")
    error: str | None = None
    next: str = Field(description="what to do now")

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Unset fields are left out (the handle stays short)."""
        return {k: v for k, v in handler(self).items() if v is not None}


@dataclass(eq=False)
class Job(Generic[T]):
    """One background operation: its task, progress and outcome."""

    job_id: int
    tool: str
    unit: str | None
    task: asyncio.Task[T]
    stages: frozenset[str]
    computing: str | None = None
    """The :func:`~.state.compute` call it awaits now (queued for the worker or running)."""
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    done: int | None = None
    total: int | None = None
    _first: tuple[float, int] | None = None
    _listeners: list[ProgressFn] = field(default_factory=list)

    # ------------------------------------------------------------------ progress (any thread)
    def progress(self, done: int, total: int) -> None:
        """Record progress (called from the compute worker) and pass it to the listeners."""
        now = time.monotonic()
        if self._first is None or (self.done is not None and done < self.done):  # new stage
            self._first = (now, done)
        self.done, self.total = done, total
        for fn in tuple(self._listeners):
            fn(done, total)

    def listen(self, fn: ProgressFn | None) -> Callable[[], None]:
        """Also send progress to ``fn`` (an MCP caller waiting); returns the undo."""
        if fn is None:
            return lambda: None
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    # ------------------------------------------------------------------ state
    @property
    def status(self) -> Status:
        if not self.task.done():
            return "running"
        if self.task.cancelled():
            return "cancelled"
        return "failed" if self.task.exception() is not None else "done"

    @property
    def stage(self) -> str | None:
        return self.computing if not self.task.done() else None

    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def eta(self) -> float | None:
        """Seconds left, from the rate since the first progress report (None: unknown)."""
        if self._first is None or self.done is None or not self.total or self.task.done():
            return None
        t0, d0 = self._first
        if self.done <= d0:
            return None
        rate = (self.done - d0) / max(time.monotonic() - t0, 1e-6)
        return max(self.total - self.done, 0) / rate

    def error(self) -> str | None:
        """The failure as the agent should read it (None unless failed or cancelled)."""
        if not self.task.done():
            return None
        if self.task.cancelled():
            return "cancelled (the server was shutting down)"
        exc = self.task.exception()
        if exc is None:
            return None
        if isinstance(exc, SpdMcpError):
            return str(exc)
        return f"internal error ({type(exc).__name__}: {exc}); details are in the server log"

    def result(self) -> T:
        """The operation's result (only when done)."""
        return self.task.result()

    def info(self, wait_hint_s: float, *, with_result: bool = True,
             worker_busy_with: str | None = None) -> JobInfo:
        """The job's state with a sentence saying what to do next (``with_result``: the reply
        carries the result of a finished job; ``worker_busy_with``: what the compute worker is
        running, for telling a queued job from a running one)."""
        status = self.status
        stage = self.stage
        if (status == "running" and stage is not None and self.done is None
                and worker_busy_with not in (None, stage)):
            status = "queued"
        w = _wait_hint(wait_hint_s)
        elapsed = round(self.elapsed(), 1)
        eta = self.eta()
        if status == "queued":
            nxt = (f"{self.tool} is queued: the compute worker is busy with {worker_busy_with} "
                   f"({_secs(elapsed)} so far). Call get_job(job_id={self.job_id}, wait_s={w}) "
                   "to wait for its result; tools that need no computation keep working.")
        elif status == "running":
            where = ", ".join(x for x in (
                f"{self.done}/{self.total} {self.unit or 'steps'}" if self.total else None,
                f"{_secs(elapsed)} so far",
                f"about {eta:.0f} s left in {self.stage or 'this stage'}" if eta is not None
                else None) if x)
            nxt = (f"{self.tool} is still running in the background ({where}). Call "
                   f"get_job(job_id={self.job_id}, wait_s={w}) to wait for its result; "
                   "meanwhile other tools work (heavy ones queue behind it).")
        elif status == "done":
            nxt = f"{self.tool} finished in {_secs(elapsed)}; " + (
                "its result is in this reply." if with_result else
                f"call get_job(job_id={self.job_id}) for its result.")
        elif status == "failed":
            exc = self.task.exception()
            nxt = (f"{self.tool} failed; " + (
                f"retry {self.tool} in ~{max(exc.retry_after_s, 1):.0f} s."
                if isinstance(exc, Busy) else
                f"fix the arguments and call {self.tool} again." if isinstance(exc, InputError)
                else f"call {self.tool} again, or report the error."))
        else:
            nxt = f"call {self.tool} again to restart it."
        return JobInfo(job_id=self.job_id, tool=self.tool, status=status, stage=stage,
                       done=self.done, total=self.total,
                       unit=self.unit if self.total else None, elapsed_s=elapsed,
                       eta_s=round(eta, 1) if eta is not None else None, error=self.error(),
                       next=nxt)


def _secs(t: float) -> str:
    return f"{t:.1f} s" if t < 10 else f"{t:.0f} s"


def _wait_hint(after_s: float) -> int:
    """A ``wait_s`` worth suggesting: about the limit (calls of that length are known to pass)."""
    return int(min(max(after_s, 10.0), MAX_WAIT_S))


class JobBook:
    """The background jobs of one app state."""

    def __init__(self, after_s: float = DEFAULT_AFTER_S, *, keep: int = KEEP_FINISHED,
                 executor: ComputeExecutor | None = None) -> None:
        self.after_s = after_s
        self.keep = keep
        self.executor = executor
        self._jobs: dict[int, Job[Any]] = {}
        self._next_id = 1
        self._closed = False

    # ------------------------------------------------------------------ running
    async def run(
        self, tool: str, work: Callable[[ProgressFn], Coroutine[Any, Any, T]], *,
        stages: Collection[str], unit: str | None = None, progress: ProgressFn | None = None,
    ) -> T | Job[T]:
        """Run ``work(progress)``: its result if it ends within the limit (or fails before its
        heavy stage: bad input raises here), else the running :class:`Job`.

        ``stages`` names the :func:`~.state.compute` calls that commit it (see the module
        docstring); ``progress`` (the caller's own reporter) hears progress while the caller
        waits. A cancelled caller cancels the operation unless it was already handed back."""
        if self._closed:
            raise Busy("the server is shutting down; retry when it is back", 5.0)

        def report(done: int, total: int) -> None:
            job.progress(done, total)  # bound late: the job is made once its task exists

        def note(name: str | None) -> None:
            job.computing = name

        ctx = contextvars.copy_context()  # the task's own: compute() reports to this job
        ctx.run(COMPUTING.set, note)
        task = asyncio.create_task(work(report), name=f"spd-job {tool}", context=ctx)
        job: Job[T] = Job(0, tool, unit, task, frozenset(stages))
        unlisten = job.listen(progress)
        try:
            if await self._settles(job):
                return job.task.result()  # the result, or the operation's error raised here
        except asyncio.CancelledError:
            job.task.cancel()
            raise
        finally:
            unlisten()
        return self._register(job)

    async def _settles(self, job: Job[Any]) -> bool:
        """Wait for the limit (at least until the job commits); True if it ended meanwhile."""
        task = job.task
        deadline = job.started + self.after_s
        while True:
            now = time.monotonic()
            if now >= deadline:
                # Committed: reporting progress (set by the worker, so seen even when this loop
                # was starved meanwhile) or awaiting a heavy stage. With a limit of 0 it is a
                # job even if it has just ended.
                if job.done is not None or job.computing in job.stages:
                    return task.done() and self.after_s > 0
                if task.done() or now >= deadline + COMMIT_GRACE_S:
                    return task.done()
                timeout = _POLL_S
            elif task.done():
                return True
            else:
                timeout = deadline - now
            await asyncio.wait({task}, timeout=timeout)

    def _register(self, job: Job[Any]) -> Job[Any]:
        job.job_id = self._next_id
        self._next_id += 1
        self._jobs[job.job_id] = job
        job.task.add_done_callback(lambda _t: self._finished(job))
        log.info("job %d: %s continues in the background", job.job_id, job.tool)
        return job

    def _finished(self, job: Job[Any]) -> None:
        job.ended = time.monotonic()
        if not job.task.cancelled() and (exc := job.task.exception()) is not None:
            if isinstance(exc, SpdMcpError):
                log.info("job %d (%s) failed: %s", job.job_id, job.tool, exc)
            else:
                log.error("job %d (%s) failed", job.job_id, job.tool, exc_info=exc)
        else:
            log.info("job %d (%s) %s after %.1f s", job.job_id, job.tool, job.status,
                     job.elapsed())
        finished = [j for j in self._jobs.values() if j.task.done()]
        for old in sorted(finished, key=lambda j: j.ended or 0.0)[:-self.keep or None]:
            del self._jobs[old.job_id]

    # ------------------------------------------------------------------ reading
    def info(self, job: Job[Any], *, with_result: bool = True) -> JobInfo:
        """Where ``job`` stands, with what to do next (see :meth:`Job.info`)."""
        busy = self.executor.running if self.executor is not None else None
        return job.info(self.after_s, with_result=with_result, worker_busy_with=busy)

    def get(self, job_id: int) -> Job[Any]:
        """A job by id; an error naming the jobs there are."""
        job = self._jobs.get(job_id)
        if job is not None:
            return job
        known = ", ".join(f"{j.job_id} ({j.tool}, {self.info(j).status})"
                          for j in self._jobs.values())
        if 0 < job_id < self._next_id:
            why = (f"job {job_id} finished and was dropped (only the last {self.keep} finished "
                   "jobs are kept); call its tool again (stored results come back at once)")
        else:
            why = f"there is no job {job_id}"
        raise InputError(f"{why}; jobs: {known}" if known else
                         f"{why}; there are no jobs (a call becomes a job when it runs longer "
                         f"than {self.after_s:g} s)")

    async def wait(self, job_id: int, wait_s: float, progress: ProgressFn | None = None
                   ) -> Job[Any]:
        """The job, after it ended or ``wait_s`` passed (``progress`` hears it meanwhile)."""
        job = self.get(job_id)
        if wait_s > 0 and not job.task.done():
            unlisten = job.listen(progress)
            try:
                await asyncio.wait({job.task}, timeout=min(wait_s, MAX_WAIT_S))
            finally:
                unlisten()
        return job

    def jobs(self) -> list[Job[Any]]:
        return list(self._jobs.values())

    # ------------------------------------------------------------------ shutdown
    async def close(self, timeout: float = 10.0) -> None:
        """Cancel the running jobs and wait (bounded) for them to end."""
        self._closed = True
        running = [j.task for j in self._jobs.values() if not j.task.done()]
        for t in running:
            t.cancel()
        if running:
            await asyncio.wait(running, timeout=timeout)


def open_book(st: AppState, after_s: float | None = None) -> JobBook:
    """Give ``st`` a job book (limit: ``after_s``, else ``$SPD_MCP_JOB_AFTER_S``, else 20 s)."""
    st.jobs = JobBook(after_s_from_env(after_s), executor=st.executor)
    return st.jobs


def job_book(st: AppState) -> JobBook:
    """``st``'s job book (a default one if the state was opened without one)."""
    return st.jobs if st.jobs is not None else open_book(st)


async def close_book(st: AppState) -> None:
    """Cancel ``st``'s running jobs and forget its book."""
    book, st.jobs = st.jobs, None
    if book is not None:
        await book.close()
