"""``spd-mcp attributions RUN [--tokens N] [--batch-size B] [--threads N]``.

Importing this module is light (no torch), so arguments are checked before torch loads.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .config import DEFAULT_TOKENS, AttributionConfig, AttributionError


def add_attributions_parser(sub: argparse._SubParsersAction) -> None:
    at = sub.add_parser(
        "attributions", help="dataset attributions: component/token -> component/output sums",
        description="spd-mcp attributions RUN: gradient x activation (source CI-weighted) "
                    "summed over the run's dataset; reused when already computed",
    )
    at.add_argument("run", metavar="RUN", help="run directory or name")
    at.add_argument("--tokens", type=int, help=f"tokens to read (default {DEFAULT_TOKENS})")
    at.add_argument("--batch-size", type=int, help="documents per batch (default 16)")
    at.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: cpu)")
    at.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def config_from_args(args: argparse.Namespace) -> AttributionConfig:
    from pydantic import ValidationError

    flags = {"n_tokens": args.tokens, "batch_size": args.batch_size}
    try:
        return AttributionConfig(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as err:
        bad = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in err.errors())
        raise AttributionError(f"bad attributions option ({bad})") from None


def attributions_command(args: argparse.Namespace) -> int:
    """Run the subcommand; usage errors raise AttributionError (a ValueError) with the reason."""
    config = config_from_args(args)

    import torch

    from spd_mcp.analysis.session import RunSession
    from spd_mcp.model.decompose import resolve_device

    from .config import config_hash
    from .runner import compute_attributions
    from .store import is_done, run_id_of, stage_dir

    stage = stage_dir(run_id_of(args.run), config_hash(run_id_of(args.run), config))
    if is_done(stage):  # before loading the model
        print(f"already computed: {stage}")
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    session = RunSession.load(args.run, device=resolve_device(args.device))
    with token_progress("attributions") as cb:
        out = compute_attributions(session, config, progress=cb)
    print(out.message)
    return 0


@contextmanager
def token_progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """``cb(done, total)``: a rich bar with tokens/s on a TTY, else a plain line every 10%."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    plain = not console.is_terminal
    t0 = time.perf_counter()
    decile = [-1]
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} tokens"), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=plain,
    ) as progress:
        task = progress.add_task(label, total=None, rate="")

        def cb(done: int, total: int) -> None:
            dt = time.perf_counter() - t0
            rate = f"{done / dt:,.0f} tok/s" if dt > 0 and done else ""
            progress.update(task, completed=done, total=total, rate=rate)
            d = done * 10 // max(1, total)
            if plain and d > decile[0]:
                decile[0] = d
                console.print(f"{label} {done}/{total} tokens {rate}", highlight=False)

        yield cb
