"""``spd-mcp attributions RUN [--tokens N] [--batch-size B] [--threads N]``.

Importing this module is light (no torch), so arguments are checked before torch loads.
"""

from __future__ import annotations

import argparse

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

    from spd_mcp.harvest.cli import token_progress
    from spd_mcp.model.decompose import resolve_device
    from spd_mcp.model.session import RunSession

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
