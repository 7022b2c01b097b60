"""Durable file writes: a reader never sees a half-written file or directory.

- :func:`write_text_atomic` / :func:`write_json_atomic` / :func:`write_bytes_atomic`: a temporary
  sibling, fsynced, renamed over the target;
- :func:`fsync_write`: a durable write of a file inside a directory that is itself published
  atomically;
- :func:`publish_dir`: fill a temporary sibling directory, rename it into place on success.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def fsync_file(path: Path) -> None:
    """Flush an already written file to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and fsync it (not atomic on its own)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_bytes_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically (temporary sibling, fsync, rename)."""
    tmp = _tmp_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj: Any, *, indent: int | None = 2) -> None:
    """``obj`` as JSON (UTF-8, a trailing newline), replacing ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


@contextmanager
def publish_dir(dst: Path) -> Iterator[Path]:
    """A temporary sibling directory to fill; when the block succeeds it replaces ``dst`` by
    rename (an existing ``dst`` is swapped out, then deleted); when it fails it is removed."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            trash = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dst, trash)
            os.replace(tmp, dst)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
