"""Progress counting shared by batched analyses."""

from __future__ import annotations

from collections.abc import Callable


class Ticker:
    """Counts finished work items and reports ``(done, total)`` (capped at total)."""

    def __init__(self, total: int, progress: Callable[[int, int], None] | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def __call__(self, n: int = 1) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(self.total, self.total)
