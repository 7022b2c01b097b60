"""``spd-mcp label RUN``: autointerp labels for a run's components (light to import)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import LLMSettings

def add_label_parser(sub: argparse._SubParsersAction) -> None:
    lb = sub.add_parser(
        "label", help="label components with an LLM from harvest examples (autointerp)",
        description="One label per firing component (densest first); resumable: re-running "
                    "continues where it stopped. Needs a harvest (`spd-mcp harvest RUN`).")
    lb.add_argument("run", metavar="RUN", help="run directory or name")
    lb.add_argument("--model", default="claude-haiku-4-5", help="model (default claude-haiku-4-5)")
    lb.add_argument("--budget-usd", type=float, default=None,
                    help="hard cost cap for this invocation (unlabelled ones are 'skipped')")
    lb.add_argument("--limit", type=int, default=None, help="label at most N components")
    lb.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    lb.add_argument("--base-url", default=None, help="API endpoint (default: ANTHROPIC_BASE_URL "
                    "or Anthropic's)")


def settings_from_args(args: argparse.Namespace) -> LLMSettings:
    """LLM settings from the shared labelling flags; usage errors raise ValueError."""
    from .client import NO_KEY, LLMSettings, api_key_configured

    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    if args.concurrency < 1:
        raise ValueError("--concurrency must be >= 1")
    if args.budget_usd is not None and args.budget_usd < 0:
        raise ValueError("--budget-usd must be >= 0")
    settings = LLMSettings(model=args.model, base_url=args.base_url,
                           max_concurrency=args.concurrency, budget_usd=args.budget_usd)
    if not api_key_configured(settings):
        raise ValueError(NO_KEY)
    return settings


def label_command(args: argparse.Namespace) -> int:
    """Run ``spd-mcp label``; usage errors raise ValueError with the reason."""
    settings = settings_from_args(args)

    from spd_mcp.harvest import load_harvest
    from spd_mcp.model.session import RunSession

    from .autointerp import label_components, select_components
    from .store import LabelStore

    session = RunSession.load(args.run)
    harvest = load_harvest(session)  # HarvestNotFound says to run `spd-mcp harvest RUN`
    keys = select_components(harvest, args.limit)
    run_id = str(session.run.meta["run_id"])
    with LabelStore.open(run_id) as store, count_progress("label") as cb:
        stage_id = asyncio.run(label_components(session, harvest, keys, settings, store,
                                                progress=cb))
    with LabelStore.open(run_id) as store:
        rows = store.labels(stage_id)
        ledger = store.ledger(stage_id)
        done = store.is_done(stage_id)
    counts = {s: sum(r.status == s for r in rows.values()) for s in ("ok", "failed", "skipped")}
    print(f"{stage_id}: {len(keys)} components, " + ", ".join(f"{v} {k}" for k, v in
                                                                counts.items()))
    print(f"ledger (stage total): {ledger.summary() if ledger else 'no calls'}")
    if done:
        print(f"done; labels in {store.path}")
        return 0
    print("not finished (budget or errors); re-run the same command to continue", file=sys.stderr)
    return 1


@contextmanager
def count_progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """``cb(done, total)``: a rich bar on a TTY, else a plain line every 10%."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    plain = not console.is_terminal
    decile = [-1]
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, disable=plain) as progress:
        task = progress.add_task(label, total=None)

        def cb(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)
            d = done * 10 // max(1, total)
            if plain and d > decile[0]:
                decile[0] = d
                console.print(f"{label} {done}/{total} ({time.perf_counter() - t0:.0f} s)",
                              highlight=False)

        yield cb
