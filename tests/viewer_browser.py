"""Driving Debian's chromium with Playwright for the viewer tests and benchmark (no download).

Chromium's background services (component updates, safe browsing, sync) would try to reach the
network; the flags keep it quiet. Every request leaving 127.0.0.1 is recorded and aborted by the
route handler, so a test can assert that a page stayed local.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
LOCAL_HOSTS = {"127.0.0.1"}


def chromium_path() -> str | None:
    """``$SPD_MCP_CHROMIUM``, else Debian's /usr/bin/chromium, else chromium on PATH."""
    for candidate in (os.environ.get("SPD_MCP_CHROMIUM"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    return shutil.which("chromium")


def missing_reason() -> str | None:
    """Why browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if chromium_path() is None:
        return ("Debian's chromium is not installed: `make test` installs it as root "
                "(apt-get install chromium); browsers are never downloaded")
    return None


@dataclass
class Traffic:
    """What a page asked for: local requests, and foreign ones (aborted)."""

    local: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@contextmanager
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@contextmanager
def local_page(b: Any, width: int = 1500, height: int = 1000) -> Iterator[tuple[Any, Traffic]]:
    """A page in a fresh context whose foreign requests are aborted and recorded."""
    ctx = b.new_context(viewport={"width": width, "height": height})
    traffic = Traffic()

    def route(r: Any) -> None:
        url = r.request.url
        if urlparse(url).hostname in LOCAL_HOSTS:
            traffic.local.append(url)
            r.continue_()
        else:
            traffic.foreign.append(url)
            r.abort()

    ctx.route("**/*", route)
    page = ctx.new_page()
    page.on("pageerror", lambda e: traffic.errors.append(f"pageerror: {e}"))
    page.on("console", lambda m: traffic.errors.append(f"console: {m.text}")
            if m.type == "error" else None)
    try:
        yield page, traffic
    finally:
        ctx.close()


def stored_graph(session: Any, gid: int) -> Any:
    """Graph ``gid`` as stored in the run's app database (read on a separate thread, because
    Playwright's sync API keeps an event loop running in the calling one)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from spd_mcp.analysis.graph_view import graph_from_bytes
    from spd_mcp.paths import app_db_path
    from spd_mcp.service.store import AppStore

    async def blob() -> bytes:
        store = await AppStore.open(app_db_path(session.run_id))
        try:
            row = await store.get_result("graph", gid)
        finally:
            await store.close()
        assert row is not None and row[2] is not None
        return row[2]

    with ThreadPoolExecutor(1) as pool:
        return graph_from_bytes(pool.submit(lambda: asyncio.run(blob())).result())
