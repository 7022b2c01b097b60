"""Background jobs of the viewer: a computation started by one request and polled by the page.

A job wraps one coroutine (which itself queues its heavy part on the shared ComputeExecutor) and a
progress counter the compute worker updates; ``GET /api/jobs/{id}`` reads a snapshot.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel

JobStatus = Literal["running", "done", "error"]
MAX_JOBS = 200


class JobView(BaseModel):
    id: str
    kind: str
    status: JobStatus
    done: int
    total: int
    message: str
    elapsed_s: float
    result: Any = None
    error: str | None = None


class Job:
    """One running or finished computation (progress is written from the compute thread)."""

    def __init__(self, kind: str, message: str) -> None:
        self.id = secrets.token_hex(6)
        self.kind = kind
        self.message = message
        self.status: JobStatus = "running"
        self.done = 0
        self.total = 0
        self.started = time.monotonic()
        self.ended: float | None = None
        self.result: Any = None
        self.error: str | None = None
        self.task: asyncio.Task[None] | None = None

    def progress(self, done: int, total: int) -> None:
        """``progress(done, total)`` for analyses; plain attribute writes, safe across threads."""
        self.done, self.total = int(done), int(total)

    def view(self) -> JobView:
        end = self.ended if self.ended is not None else time.monotonic()
        return JobView(id=self.id, kind=self.kind, status=self.status, done=self.done,
                       total=self.total, message=self.message,
                       elapsed_s=round(end - self.started, 2), result=self.result,
                       error=self.error)


class Jobs:
    """The jobs of one viewer process (the oldest finished ones are forgotten past MAX_JOBS)."""

    def __init__(self, describe_error: Callable[[BaseException], str | None]) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._describe = describe_error

    def start(self, kind: str, message: str,
              work: Callable[[Job], Awaitable[Any]]) -> Job:
        """Run ``work(job)`` in a task; its return value (JSON-able) becomes the job's result."""
        job = Job(kind, message)

        async def runner() -> None:
            try:
                job.result = await work(job)
                job.status = "done"
            except Exception as exc:
                known = self._describe(exc)
                job.error = known or f"{type(exc).__name__}: {exc}"
                job.status = "error"
            finally:
                job.ended = time.monotonic()

        job.task = asyncio.get_running_loop().create_task(runner())
        self._jobs[job.id] = job
        while len(self._jobs) > MAX_JOBS:
            oldest = next(iter(self._jobs.values()))
            if oldest.status == "running":
                break
            self._jobs.popitem(last=False)
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    async def cancel_all(self) -> None:
        tasks = [j.task for j in self._jobs.values() if j.task is not None and not j.task.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
