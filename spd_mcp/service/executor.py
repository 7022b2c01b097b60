"""The compute executor ("GPU lock"): one worker thread owns the device.

Heavy calls are queued FIFO and run one at a time on the worker, so device work never overlaps;
cheap calls never touch it. A bounded queue and a bounded wait turn overload into a fast
:class:`Busy` error ("retry in ~N s") instead of a hang. A job whose caller went away before it
started is skipped; a job that started runs to the end (the lock is released when the computation
ends, not when a client disconnects).

Given a device (:meth:`ComputeExecutor.use_device`), the worker also holds that device's
machine-wide lock (:mod:`.devlock`) around each job, so the executors of several processes on one
machine take turns too (FIFO across them); the job's wait bound covers that wait as well.

Given a :class:`~.worker.WorkerProcess`, jobs submitted as a :class:`~.worker.Call` run in that
child process (the thread only waits on it, GIL released), so the server's cheap calls do not
queue behind Python-heavy analysis code; plain callables still run on the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

from spd_mcp.errors import SpdMcpError

from .devlock import DeviceBusy, DeviceLock, enabled
from .worker import Call, WorkerProcess

T = TypeVar("T")


class Busy(SpdMcpError):
    """The executor cannot take or start the job in time."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class JobRecord:
    name: str
    queued: float
    started: float
    ended: float
    ok: bool
    lock_wait_s: float = 0.0
    """Time spent waiting for the machine-wide device lock (inside ``started - queued``)."""


@dataclass
class _Job:
    name: str
    fn: Callable[[], Any]
    future: cf.Future[Any]
    queued: float


class ComputeExecutor:
    """FIFO single-worker executor with a queue bound and a wait bound."""

    def __init__(
        self, *, max_queue: int = 16, max_wait_s: float = 120.0, history: int = 256,
        device: str | None = None, worker: WorkerProcess | None = None,
    ) -> None:
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self._pending = 0  # queued or running
        self._lock = threading.Lock()
        self._durations: deque[float] = deque(maxlen=32)
        self.history: deque[JobRecord] = deque(maxlen=history)
        self.running: str | None = None
        self.devices: tuple[DeviceLock, ...] = ()
        """Device locks held around each job (sorted by name: several are taken in one order)."""
        self.waiting_for: DeviceLock | None = None
        """The device lock the worker is waiting for, if any."""
        self.worker = worker
        """Where :class:`Call` jobs run (others run on this executor's thread); None: here."""
        if device is not None:
            self.use_device(device)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._work, name="spd-compute", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------- worker
    def _work(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            try:
                with ExitStack() as held:
                    t0 = time.monotonic()
                    if job.future.cancelled() or not self._take_devices(job, held):
                        continue
                    if not job.future.set_running_or_notify_cancel():
                        continue  # the caller gave up before the job started
                    ok, out = self._run_job(job, time.monotonic() - t0)
                # the device is free again before the caller hears back
                if ok:
                    job.future.set_result(out)
                else:
                    job.future.set_exception(out)
            finally:
                with self._lock:
                    self._pending -= 1

    def _take_devices(self, job: _Job, held: ExitStack) -> bool:
        """Hold every device lock (within the job's wait bound); False if the job is off."""
        if not self.devices or not enabled():
            return True
        for lock in self.devices:
            self.waiting_for = lock
            try:
                hold = lock.acquire(
                    job.name, deadline=job.queued + self.max_wait_s,
                    estimate_s=self.mean_duration(),
                    abandon=lambda: job.future.cancelled() or self._closing.is_set())
            except (DeviceBusy, OSError) as exc:  # OSError: the lock directory is unusable
                fail = Busy(str(exc), exc.retry_after_s) if isinstance(exc, DeviceBusy) else exc
                with suppress(cf.InvalidStateError):  # unless the caller withdrew it meanwhile
                    job.future.set_exception(fail)
                return False
            finally:
                self.waiting_for = None
            if hold is None:  # withdrawn, or shutting down, while waiting
                job.future.cancel()
                return False
            held.callback(hold.release)
        return True

    def _run_job(self, job: _Job, lock_wait_s: float) -> tuple[bool, Any]:
        """Run it and record it; (True, result) or (False, the exception for the caller)."""
        self.running = job.name
        started = time.monotonic()
        ok = False
        try:
            fn = job.fn
            out = self.worker.run(fn) if self.worker is not None and isinstance(fn, Call) else fn()
            ok = True
            return True, out
        except BaseException as exc:  # handed to the caller
            return False, exc
        finally:
            ended = time.monotonic()
            self.running = None
            self._durations.append(ended - started)
            self.history.append(JobRecord(job.name, job.queued, started, ended, ok, lock_wait_s))

    # ----------------------------------------------------------------------------- API
    def use_device(self, device: str) -> None:
        """Also hold ``device``'s machine-wide lock around each job (a device added twice is
        held once)."""
        lock = DeviceLock(device)
        if all(d.device != lock.device for d in self.devices):
            self.devices = tuple(sorted((*self.devices, lock), key=lambda d: d.device))

    def mean_duration(self) -> float:
        return sum(self._durations) / len(self._durations) if self._durations else 1.0

    def estimated_wait(self) -> float:
        with self._lock:
            pending = self._pending
        return pending * self.mean_duration()

    def submit(self, name: str, fn: Callable[[], T]) -> cf.Future[T]:
        """Queue ``fn``; raises :class:`Busy` at once when the queue is full."""
        with self._lock:
            if self._pending >= self.max_queue:
                wait = self._pending * self.mean_duration()
                raise Busy(
                    f"busy: {self._pending} compute jobs are queued or running (limit "
                    f"{self.max_queue}); retry in ~{wait:.0f} s",
                    wait,
                )
            self._pending += 1
        fut: cf.Future[T] = cf.Future()
        self._q.put(_Job(name, fn, fut, time.monotonic()))
        return fut

    async def run(self, name: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker and await it without blocking the event loop.

        If it has not started within ``max_wait_s`` it is withdrawn and :class:`Busy` is raised.
        If the awaiting task is cancelled, a queued job is withdrawn; a running one finishes.
        """
        fut = self.submit(name, fn)
        afut = asyncio.wrap_future(fut)
        deadline = time.monotonic() + self.max_wait_s
        try:
            while True:
                remaining = deadline - time.monotonic()
                if fut.running() or fut.done() or remaining <= 0:
                    break
                done, _ = await asyncio.wait({afut}, timeout=min(0.05, remaining))
                if done:
                    break
            if not (fut.running() or fut.done()) and fut.cancel():
                if (lock := self.waiting_for) is not None:
                    exc = lock.busy()
                    raise Busy(str(exc), exc.retry_after_s)
                wait = self.estimated_wait()
                raise Busy(
                    f"busy: the job did not start within {self.max_wait_s:.0f} s; "
                    f"retry in ~{max(wait, 1):.0f} s",
                    wait,
                )
            return await asyncio.shield(afut)
        except asyncio.CancelledError:
            fut.cancel()  # only succeeds if it has not started
            raise

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop after the queued jobs (one waiting for a device lock gives up)."""
        self._closing.set()
        self._q.put(None)
        self._thread.join(timeout)
        if self.worker is not None:
            self.worker.close()
