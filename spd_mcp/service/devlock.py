"""A machine-wide lock per device, shared by every server and CLI job on the machine.

The compute executor keeps one process's heavy calls apart; this lock keeps several processes'
apart (``spd-mcp investigate --agents N`` starts N servers on one device). It is a FIFO ticket
queue in ``$SPD_MCP_HOME/locks/<device>/``:

1. Under ``flock(seq)``, a waiter takes the next sequence number and publishes a ticket file
   ``tickets/<seq>`` (pid, job, estimate) that it keeps ``flock``-ed from before it appears.
2. It polls until its ticket is the oldest live one; a ticket whose ``flock`` can be taken is
   dead (its process died: the kernel drops the lock, SIGKILL included) and is removed.
3. It then takes ``flock(lock)`` and writes itself there as the holder (pid, job, start).

Release appends the span to ``spans.jsonl`` (the recent holders), then drops the holder
``flock``, then the ticket. ``SPD_MCP_DEVICE_LOCK=0`` turns it all off.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spd_mcp.errors import SpdMcpError
from spd_mcp.paths import spd_home

ENV = "SPD_MCP_DEVICE_LOCK"
RECORD_BYTES = 512  # the holder record, rewritten in place with one pwrite
SPAN_LOG_BYTES = 256 * 1024  # spans.jsonl is cut to its newer half beyond this
POLL_MAX_S = 0.02  # polling backs off from 1 ms to this (bounds the hand-over after a death)


def enabled() -> bool:
    """Whether device locks are on (``SPD_MCP_DEVICE_LOCK=0`` turns them off; default on)."""
    return os.environ.get(ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


def normalize(device: str) -> str:
    """The lock name of a device: ``cuda`` means ``cuda:0``."""
    device = str(device).strip().lower()
    return "cuda:0" if device == "cuda" else device


@dataclass(frozen=True)
class Ticket:
    """A process queued for (or holding) a device; times are wall-clock (``time.time()``)."""

    seq: int
    pid: int
    job: str
    queued: float
    estimate_s: float
    started: float | None = None  # set on the holder

    def who(self) -> str:
        if self.pid == os.getpid():
            return f"another executor in this process (job {self.job})"
        return f"another process (pid {self.pid}, job {self.job})"


@dataclass(frozen=True)
class Span:
    """One past hold of the device (wall-clock times)."""

    pid: int
    job: str
    start: float
    end: float


@dataclass(frozen=True)
class LockStatus:
    device: str
    holder: Ticket | None
    waiting: list[Ticket]  # oldest first, the holder excluded


class DeviceBusy(SpdMcpError):
    """The device lock could not be had in time; names the holder and estimates the wait."""

    def __init__(self, message: str, holder: Ticket | None, retry_after_s: float) -> None:
        super().__init__(message)
        self.holder = holder
        self.retry_after_s = retry_after_s


class Hold:
    """A held device lock; :meth:`release` (or leaving the ``with`` block) gives it back."""

    def __init__(
        self, lock: DeviceLock, job: str, ticket: Path | None, tfd: int, lfd: int
    ) -> None:
        self.lock, self.job, self._ticket, self._tfd, self._lfd = lock, job, ticket, tfd, lfd
        self.acquired = time.time()
        self.released: float | None = None

    def release(self) -> None:
        if self.released is not None:
            return
        self.released = time.time()
        if self._lfd >= 0:
            with suppress(OSError):  # the log is a record, not part of the lock
                self.lock._log(Span(os.getpid(), self.job, self.acquired, self.released))
            os.pwrite(self._lfd, b" " * RECORD_BYTES, 0)  # no holder
        _drop(self._ticket, self._tfd, self._lfd)

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class DeviceLock:
    """The machine-wide FIFO lock of one device (cheap to build; holds no open files)."""

    def __init__(self, device: str, root: Path | None = None) -> None:
        self.device = normalize(device)
        safe = re.sub(r"[^a-z0-9:._-]", "_", self.device)
        self.dir = (root or spd_home() / "locks") / safe
        self.tickets = self.dir / "tickets"

    # ----------------------------------------------------------------------------- acquire
    def acquire(
        self, job: str, *, deadline: float | None = None, estimate_s: float = 1.0,
        abandon: Callable[[], bool] | None = None,
    ) -> Hold | None:
        """Wait in line for the device until ``deadline`` (``time.monotonic()``; None: forever).

        Returns the :class:`Hold`, or None if ``abandon()`` turned true while waiting; raises
        :class:`DeviceBusy` at the deadline. With locks turned off it returns a no-op hold.
        """
        if not enabled():
            return Hold(self, job, None, -1, -1)
        self.tickets.mkdir(parents=True, exist_ok=True)
        lfd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            seq, tfd = self._issue(job, estimate_s)
        except BaseException:
            os.close(lfd)
            raise
        ticket = self.tickets / f"{seq:012d}"
        delay = 0.001
        try:
            while True:
                if self._first(ticket.name) and _try_flock(lfd, fcntl.LOCK_EX):
                    hold = Hold(self, job, ticket, tfd, lfd)
                    rec = {"seq": seq, "pid": os.getpid(), "job": job[:60],
                           "started": hold.acquired, "estimate_s": estimate_s}
                    os.pwrite(lfd, json.dumps(rec).encode().ljust(RECORD_BYTES), 0)
                    return hold
                if abandon is not None and abandon():
                    break
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise self.busy(before=seq)
                time.sleep(delay if deadline is None else min(delay, deadline - now))
                delay = min(2 * delay, POLL_MAX_S)
        except BaseException:
            _drop(ticket, tfd, lfd)
            raise
        _drop(ticket, tfd, lfd)
        return None

    def _issue(self, job: str, estimate_s: float) -> tuple[int, int]:
        """Take the next number and publish its ticket, already flock-ed (so never seen dead)."""
        info = {"pid": os.getpid(), "job": job[:60], "queued": time.time(),
                "estimate_s": estimate_s}
        sfd = os.open(self.dir / "seq", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(sfd, fcntl.LOCK_EX)
            try:
                seq = int(os.pread(sfd, 32, 0) or b"0")
            except ValueError:
                seq = 0
            os.pwrite(sfd, f"{seq + 1:<31}".encode(), 0)  # first: a failure below leaves a gap
            tmp = self.tickets / f".new-{os.getpid()}-{threading.get_ident()}"
            tfd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                fcntl.flock(tfd, fcntl.LOCK_EX)
                os.write(tfd, json.dumps(info).encode())
                os.rename(tmp, self.tickets / f"{seq:012d}")
            except BaseException:
                _drop(tmp, tfd, -1)
                raise
        finally:
            os.close(sfd)
        return seq, tfd

    def _first(self, mine: str) -> bool:
        """Whether no live ticket is older than ``mine`` (dead ones found on the way go)."""
        for name in sorted(os.listdir(self.tickets)):
            if name.startswith(".") or name >= mine:
                return True
            if _read_live(self.tickets / name) is not None:
                return False
            (self.tickets / name).unlink(missing_ok=True)
        return True

    def _log(self, span: Span) -> None:
        """Append a span (only the holder writes, so no two writers race)."""
        path = self.dir / "spans.jsonl"
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps([span.pid, span.job[:60], span.start, span.end]) + "\n")
            size = fh.tell()
        if size > SPAN_LOG_BYTES:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(lines[len(lines) // 2:]), encoding="utf-8")
            os.replace(tmp, path)

    def spans(self) -> list[Span]:
        """The recent holds of the device, oldest first (about the last thousand)."""
        try:
            lines = (self.dir / "spans.jsonl").read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        return [Span(*json.loads(line)) for line in lines if line]

    # ----------------------------------------------------------------------------- status
    def status(self) -> LockStatus:
        """Who holds the device and who waits (dead tickets skipped)."""
        live: list[Ticket] = []
        names = sorted(os.listdir(self.tickets)) if self.tickets.is_dir() else []
        for name in names:
            if name.startswith("."):
                continue
            info = _read_live(self.tickets / name)
            if info is not None:
                live.append(Ticket(int(name), info["pid"], info["job"], info["queued"],
                                   info["estimate_s"]))
        rec = _read_json(self.dir / "lock")
        if live and rec is not None and rec.get("seq") == live[0].seq:
            head = live[0]
            holder = Ticket(head.seq, head.pid, head.job, head.queued, head.estimate_s,
                            rec["started"])
            return LockStatus(self.device, holder, live[1:])
        return LockStatus(self.device, None, live)

    def estimated_wait(self, st: LockStatus, before: int | None = None) -> float:
        """Seconds until a newcomer (or ticket ``before``) gets the device, by the estimates."""
        wait = 0.0
        if st.holder is not None:
            wait += max(st.holder.estimate_s - (time.time() - (st.holder.started or 0)), 0.0)
        return wait + sum(t.estimate_s for t in st.waiting if before is None or t.seq < before)

    def busy(self, before: int | None = None) -> DeviceBusy:
        """The :class:`DeviceBusy` describing the current holder (``before``: our own ticket)."""
        st = self.status()
        wait = max(self.estimated_wait(st, before), 1.0)
        first = st.holder or next((t for t in st.waiting if t.seq != before), None)
        who = first.who() if first is not None else "another process"
        verb = "holds" if st.holder is not None else "is next for"
        return DeviceBusy(f"busy: {who} {verb} the {self.device} device lock; "
                          f"retry in ~{wait:.0f} s", st.holder, wait)


def _drop(ticket: Path | None, tfd: int, lfd: int) -> None:
    """Close the lock file (dropping its flock first: the next ticket then finds it free), then
    withdraw the ticket."""
    if lfd >= 0:
        os.close(lfd)
    if ticket is not None:
        ticket.unlink(missing_ok=True)
        os.close(tfd)


def _try_flock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_live(path: Path) -> dict[str, Any] | None:
    """A ticket's contents if its owner still holds it (None: dead or gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if _try_flock(fd, fcntl.LOCK_SH):
            return None  # nobody holds it: its owner died
        return json.loads(os.read(fd, RECORD_BYTES))
    except ValueError:
        return {"pid": -1, "job": "?", "queued": 0.0, "estimate_s": 1.0}
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_bytes()[:RECORD_BYTES] or b"null")
    except (OSError, ValueError):
        return None


def device_lock(device: str, job: str, *, timeout_s: float | None = None) -> Hold:
    """Hold ``device`` for a CLI job: ``with device_lock("cuda:0", "decompose"): ...``."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    hold = DeviceLock(device).acquire(job, deadline=deadline)
    assert hold is not None  # no abandon callback
    return hold
