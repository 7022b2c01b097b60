"""One task directory per investigation (DESIGN §9) and its crash-safe append-only files.

Appends (``events.jsonl``, ``explanations.jsonl``, ``research_log.md``) are one ``os.write`` of a
whole record on an ``O_APPEND`` descriptor, then fsync, so concurrent writers never interleave and
a crash leaves at most a torn last line, which readers skip. ``summary.json``, ``task.json`` and
artifacts are replaced atomically (temp file + rename).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from spd_mcp.files import write_json_atomic
from spd_mcp.paths import investigations_root

Status = Literal["in_progress", "completed", "inconclusive"]
LOG_MARKER = "<!-- entry "


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Event(BaseModel):
    """The one event schema every writer uses (server, launcher, demo, CLI)."""

    ts: str
    source: str
    type: str
    message: str
    data: dict[str, Any] | None = None


class Summary(BaseModel):
    title: str = ""
    summary: str = ""
    status: Status = "in_progress"
    updated: str = Field(default_factory=now_iso)


class TaskInfo(BaseModel):
    """``task.json`` (plus the directory it was read from)."""

    id: str
    run: str
    question: str
    model: str | None = None
    max_turns: int | None = None
    created: str
    launcher: dict[str, Any] | None = None
    path: str = ""


# -- low-level file primitives ---------------------------------------------------------------------
def append_bytes(path: Path, data: bytes) -> None:
    """Append ``data`` with one write on an O_APPEND descriptor, then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):  # pragma: no cover - regular files write fully
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
    append_bytes(path, line.encode())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Whole records of a JSONL file; a torn (unterminated or unparseable) line is skipped."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


# -- task directories ------------------------------------------------------------------------------
class TaskDir:
    """A task directory; every method reads or appends files (no cached state except the path)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def id(self) -> str:
        try:
            return self.info().id
        except (OSError, ValueError):
            return self.path.name

    # paths
    @property
    def task_json(self) -> Path:
        return self.path / "task.json"

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def log_path(self) -> Path:
        return self.path / "research_log.md"

    @property
    def explanations_path(self) -> Path:
        return self.path / "explanations.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def artifacts_dir(self) -> Path:
        return self.path / "artifacts"

    def exists(self) -> bool:
        return self.task_json.is_file()

    def info(self) -> TaskInfo:
        info = TaskInfo.model_validate_json(self.task_json.read_text())
        info.path = str(self.path)
        return info

    # writers
    def append_event(
        self, source: str, type: str, message: str, data: dict[str, Any] | None = None
    ) -> Event:
        ev = Event(ts=now_iso(), source=source, type=type, message=message, data=data)
        append_jsonl(self.events_path, ev.model_dump())
        return ev

    def append_log(self, entry: str, title: str | None = None) -> int:
        """Append a timestamped markdown section; returns the number of entries afterwards."""
        n = self.n_log_entries() + 1
        ts = now_iso()
        head = f"## {title}" if title else f"## Entry {n}"
        text = f"\n{LOG_MARKER}{n} {ts} -->\n{head}\n\n_{ts}_\n\n{entry.rstrip()}\n"
        append_bytes(self.log_path, text.encode())
        return n

    def append_explanation(self, record: dict[str, Any]) -> None:
        append_jsonl(self.explanations_path, record)

    def set_summary(self, title: str, summary: str, status: Status) -> Summary:
        s = Summary(title=title, summary=summary, status=status)
        write_json_atomic(self.summary_path, s.model_dump())
        return s

    def write_artifact(self, artifact_id: str, obj: dict[str, Any]) -> Path:
        self.artifacts_dir.mkdir(exist_ok=True)
        path = self.artifacts_dir / f"{artifact_id}.json"
        write_json_atomic(path, obj)
        return path

    # readers
    def events(self) -> list[Event]:
        out = []
        for rec in read_jsonl(self.events_path):
            try:
                out.append(Event.model_validate(rec))
            except ValueError:
                continue
        return out

    def explanations(self) -> list[dict[str, Any]]:
        return read_jsonl(self.explanations_path)

    def summary(self) -> Summary:
        try:
            return Summary.model_validate_json(self.summary_path.read_text())
        except (OSError, ValueError):
            return Summary()

    def artifacts(self) -> list[str]:
        """Artifact ids, oldest first."""
        if not self.artifacts_dir.is_dir():
            return []
        files = [p for p in self.artifacts_dir.glob("*.json") if not p.name.startswith(".")]
        return [p.stem for p in sorted(files, key=lambda p: (p.stat().st_mtime, p.name))]

    def artifact(self, artifact_id: str) -> dict[str, Any]:
        return json.loads((self.artifacts_dir / f"{artifact_id}.json").read_text())  # type: ignore[no-any-return]

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def n_log_entries(self) -> int:
        return sum(1 for line in self.log_text().splitlines() if line.startswith(LOG_MARKER))


def new_task_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def create_task(
    run: str,
    question: str,
    *,
    root: Path | None = None,
    model: str | None = None,
    max_turns: int | None = None,
    launcher: dict[str, Any] | None = None,
    path: Path | None = None,
) -> TaskDir:
    """A new task directory under ``root`` (or exactly at ``path``): task.json, an empty research
    log, an in-progress summary and a ``task_created`` event."""
    tid = new_task_id()
    if path is None:
        path = (root or investigations_root()) / tid
    path.mkdir(parents=True, exist_ok=True)
    (path / "artifacts").mkdir(exist_ok=True)
    td = TaskDir(path)
    info = TaskInfo(id=tid, run=run, question=question, model=model, max_turns=max_turns,
                    created=now_iso(), launcher=launcher)
    write_json_atomic(td.task_json, info.model_dump(exclude={"path"}))
    td.log_path.touch()
    td.set_summary("", "", "in_progress")
    td.append_event("task", "task_created", f"task {tid} created for run {run}",
                    {"question": question})
    return td


def list_tasks(root: Path | None = None) -> list[TaskInfo]:
    """Tasks under ``root``, newest first (directories without a readable task.json are skipped)."""
    base = root or investigations_root()
    if not base.is_dir():
        return []
    out = []
    for p in base.iterdir():
        td = TaskDir(p)
        if not td.exists():
            continue
        try:
            out.append(td.info())
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda t: t.created, reverse=True)
