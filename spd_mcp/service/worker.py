"""Heavy analyses in a worker process, so cheap tools never wait on them for the GIL.

A :class:`Call` names a module-level function and its arguments; the function's first argument is
the run's :class:`RunSession`. The executor's thread runs a Call either here (no worker) or by
sending it to the :class:`WorkerProcess`, which loads each run once (by its directory) and applies
the function to its own session. While the worker computes, the executor's thread sleeps in a
pipe read with the GIL released, so the server process stays free for cheap calls.

Wire: the server sends ``pickle((fn, args, kwargs, run_path, device, wants_progress))``; the
worker answers with any number of ``("progress", done, total)`` and then one ``("ok", result)``
or ``("error", exception)``. A worker that dies (killed, out of memory) fails its job with an
:class:`OperationError` and is started again on the next call.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from spd_mcp.errors import OperationError
from spd_mcp.model.session import RunSession

log = logging.getLogger("spd_mcp.worker")

ProgressFn = Callable[[int, int], None]


class Call:
    """``fn(session, *args, **kwargs)`` (plus ``progress=`` when one is given), runnable here or
    in the worker. ``fn`` must be a module-level function so it pickles by reference."""

    def __init__(self, fn: Callable[..., Any], session: RunSession, *args: Any,
                 progress: ProgressFn | None = None, **kwargs: Any) -> None:
        self.fn, self.session, self.args, self.kwargs = fn, session, args, kwargs
        self.progress = progress

    def __call__(self) -> Any:
        """Run in this process (no worker)."""
        extra = {"progress": self.progress} if self.progress is not None else {}
        return self.fn(self.session, *self.args, **self.kwargs, **extra)

    def wire(self) -> bytes:
        return pickle.dumps((self.fn, self.args, self.kwargs, str(self.session.run.path),
                             str(self.session.device), self.progress is not None))


def remote(fn: Callable[..., Any], session: RunSession, *args: Any,
           progress: ProgressFn | None = None, **kwargs: Any) -> Call:
    """A :class:`Call` (the form the executor sends to a worker process when it has one)."""
    return Call(fn, session, *args, progress=progress, **kwargs)


# ------------------------------------------------------------------------------ the child side
def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives a pickle round trip, else an OperationError carrying its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return OperationError(f"{type(exc).__name__}: {exc}")


def _serve(conn: Connection, threads: int | None, preload: tuple[str, str] | None) -> None:
    """The worker's loop: one job at a time, sessions cached by run directory."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    sessions: dict[tuple[str, str], RunSession] = {}
    if preload is not None:  # load the served run while the server answers its first calls
        with contextlib.suppress(Exception):  # a failure shows again, with its text, on use
            sessions[preload] = RunSession.load(preload[0], device=preload[1])
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the server went away
        try:
            fn, args, kwargs, run_path, device, wants_progress = pickle.loads(data)
            key = (run_path, device)
            if key not in sessions:
                sessions[key] = RunSession.load(run_path, device=device)
            if wants_progress:
                kwargs = {**kwargs, "progress": lambda d, t: conn.send_bytes(
                    pickle.dumps(("progress", int(d), int(t))))}
            reply: tuple[str, Any] = ("ok", fn(sessions[key], *args, **kwargs))
        except BaseException as exc:  # handed to the caller
            if not isinstance(exc, Exception):
                raise
            log.debug("worker job failed:\n%s", traceback.format_exc())
            reply = ("error", _portable(exc))
        try:
            payload = pickle.dumps(reply)
        except Exception as exc:
            payload = pickle.dumps(("error", OperationError(
                f"the worker could not send its result back ({type(exc).__name__}: {exc})")))
        conn.send_bytes(payload)


def _main(conn: Connection, threads: int | None, preload: tuple[str, str] | None) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        _serve(conn, threads, preload)


# ----------------------------------------------------------------------------- the parent side
class WorkerProcess:
    """A child process that runs :class:`Call` jobs, one at a time, started on first use.

    Only the executor's single thread calls :meth:`run`; :meth:`close` may come from any
    thread."""

    def __init__(self, *, threads: int | None = None,
                 preload: RunSession | None = None) -> None:
        self.threads = threads
        self.preload = ((str(preload.run.path), str(preload.device)) if preload is not None
                        else None)
        self._proc: Any = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self.starts = 0
        """How many times a worker process was started (a restart after a death counts)."""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def start(self) -> None:
        """Start the child now (it is also started lazily by the first job)."""
        with self._lock:
            if self._proc is not None and self._proc.is_alive():
                return
            ctx = mp.get_context("spawn")  # fork would copy the server's threads and locks
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_main, args=(child, self.threads, self.preload),
                               name="spd-worker", daemon=True)
            proc.start()
            child.close()
            self._proc, self._conn = proc, parent
            self.starts += 1

    def run(self, call: Call) -> Any:
        """Run ``call`` in the child and return its result (raises what the job raised)."""
        self.start()
        conn = self._conn
        assert conn is not None
        try:
            conn.send_bytes(call.wire())
            while True:
                kind, *body = pickle.loads(conn.recv_bytes())
                if kind == "progress":
                    if call.progress is not None:
                        call.progress(*body)
                    continue
                if kind == "error":
                    raise body[0]
                return body[0]
        except (EOFError, ConnectionError, BrokenPipeError) as exc:
            code = self._reap()
            why = (f"killed by signal {-code}" + (" (perhaps out of memory)" if code == -9
                                                   else "")
                   if code is not None and code < 0 else f"exit code {code}")
            raise OperationError(
                f"the compute worker process died ({why}) while running "
                f"{getattr(call.fn, '__name__', call.fn)!s}; it is started again on the next "
                "call") from exc

    def _reap(self) -> int | None:
        with self._lock:
            proc, self._proc = self._proc, None
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        if proc is None:
            return None
        proc.join(5)
        return proc.exitcode

    def close(self, timeout: float = 2.0) -> None:
        """Stop the child: an idle one exits on EOF, a busy one is killed (its job is
        abandoned; a reader blocked on it sees EOF)."""
        with self._lock:
            proc, conn = self._proc, self._conn
            self._proc = self._conn = None
        if proc is None:
            return
        if conn is not None:
            conn.close()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def worker_enabled(default: bool = True) -> bool:
    """``SPD_MCP_WORKER=0`` runs heavy analyses in the server process instead."""
    v = os.environ.get("SPD_MCP_WORKER")
    return default if v is None else v.strip().lower() not in ("0", "false", "no", "off", "")


__all__ = ["Call", "WorkerProcess", "remote", "worker_enabled"]
