"""``spd-mcp harvest RUN [--shard i/n]`` and ``spd-mcp harvest merge RUN``.

Importing this module is light (no torch), so arguments are checked before torch loads. Shards
are independent processes that write only their own directory (SLURM-array friendly); a merge
combines them once all are finished.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .config import HarvestConfig, HarvestError, ShardSpec


def add_harvest_parser(sub: argparse._SubParsersAction) -> None:
    hv = sub.add_parser(
        "harvest", help="harvest firing / token / co-firing statistics and activation examples",
        description="spd-mcp harvest RUN [--shard i/n]  |  spd-mcp harvest merge RUN",
    )
    hv.add_argument("target", nargs="+", metavar="RUN", help="RUN, or: merge RUN")
    hv.add_argument("--tokens", type=int, help="tokens to read (default 200000)")
    hv.add_argument("--batch-size", type=int, help="documents per batch (default 32)")
    hv.add_argument("--threshold", type=float, help="fires where CI > this (default: the run's)")
    hv.add_argument("--window", type=int, help="example tokens each side (default 8)")
    hv.add_argument("--n-examples", type=int, help="examples kept per component (default 30)")
    hv.add_argument("--seed", type=int, help="example sampling seed (default 0)")
    hv.add_argument("--shard", help="i/n: harvest only shard i of n (0-based); then `merge`")
    hv.add_argument("--shards", type=int, help="(merge) the shard count (default: inferred)")
    hv.add_argument("--checkpoint-every", type=int, default=50,
                    help="batches between checkpoints (default 50)")
    hv.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: cpu)")
    hv.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def config_from_args(args: argparse.Namespace) -> HarvestConfig:
    from pydantic import ValidationError

    flags = {"n_tokens": args.tokens, "batch_size": args.batch_size,
             "fire_threshold": args.threshold, "window": args.window,
             "n_examples": args.n_examples, "seed": args.seed}
    try:
        return HarvestConfig(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as err:
        bad = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in err.errors())
        raise HarvestError(f"bad harvest option ({bad})") from None


def harvest_command(args: argparse.Namespace) -> int:
    """Run the subcommand; usage errors raise HarvestError (a ValueError) with the reason."""
    target = list(args.target)
    merge = len(target) == 2 and target[0] == "merge"
    if not (len(target) == 1 or merge):
        raise HarvestError("usage: spd-mcp harvest RUN [--shard i/n]  |  spd-mcp harvest merge RUN")
    run = target[-1]
    if merge and args.shard:
        raise HarvestError("--shard harvests one shard; `harvest merge` combines all of them")
    if args.shards is not None and (args.shards < 1 or not merge):
        raise HarvestError("--shards N (N >= 1) is an option of `harvest merge`")
    if args.checkpoint_every < 1:
        raise HarvestError("--checkpoint-every must be >= 1")
    shard = ShardSpec.parse(args.shard) if args.shard else None
    config = config_from_args(args)

    import torch

    from spd_mcp.model.decompose import resolve_device

    from .runner import harvest, merge_shards, run_shard

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if merge:  # co-firing is counted here, on --device
        print(merge_shards(run, config, args.shards, device=resolve_device(args.device)).message)
        return 0

    from spd_mcp.model.session import RunSession

    session = RunSession.load(run, device=resolve_device(args.device))
    label = "harvest" if shard is None else f"shard {shard.index}/{shard.count}"
    with token_progress(label) as cb:
        if shard is None:
            out = harvest(session, config, checkpoint_every=args.checkpoint_every, progress=cb)
        else:
            out = run_shard(session, config, shard, checkpoint_every=args.checkpoint_every,
                            progress=cb)
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
    t0: list[float] = []
    start, decile = [0], [-1]
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(),
        TextColumn("{task.fields[tokens]}"), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=plain,
    ) as progress:
        task = progress.add_task(label, total=None, tokens="", rate="")

        def cb(done: int, total: int) -> None:
            now = time.perf_counter()
            if not t0:  # the first call reports progress restored from a checkpoint
                t0.append(now)
                start[0] = done
            dt = now - t0[0]
            rate = f"{(done - start[0]) / dt:,.0f} tok/s" if dt > 0 else ""
            progress.update(task, completed=done, total=total, rate=rate,
                            tokens=f"{done:,}/{total:,} tokens")
            d = done * 10 // max(1, total)
            if plain and d > decile[0]:
                decile[0] = d
                console.print(f"{label} {done}/{total} tokens {rate}", highlight=False)

        yield cb
