"""``spd-mcp graph-interp RUN`` and ``spd-mcp score-labels RUN`` (light to import)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from .cli import settings_from_args


def _llm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory or name")
    p.add_argument("--model", default="claude-haiku-4-5", help="model (default claude-haiku-4-5)")
    p.add_argument("--budget-usd", type=float, default=None,
                   help="hard cost cap for this invocation (refused asks are stored 'skipped')")
    p.add_argument("--limit", type=int, default=None, help="at most N components")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--base-url", default=None,
                   help="API endpoint (default: ANTHROPIC_BASE_URL or Anthropic's)")


def add_graph_interp_parsers(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "graph-interp", help="label components using the attribution graph (three passes)",
        description="Output pass (late → early, downstream labels as context), input pass "
                    "(early → late, upstream labels), then one unified label per component. "
                    "Resumable. Needs a harvest and dataset attributions "
                    "(`spd-mcp prepare RUN`). --limit N: the N most frequently firing.")
    _llm_args(g)
    s = sub.add_parser(
        "score-labels", help="score the best labels (detection or fuzzing)",
        description="Detection: can the model tell firing from non-firing windows by the label? "
                    "(balanced accuracy). Fuzzing: can it tell the true firing token from a "
                    "wrong one? (accuracy). Resumable.")
    _llm_args(s)
    s.add_argument("--method", required=True, choices=["detection", "fuzzing"])
    s.add_argument("--trials", type=int, default=None, help="trials per component (default 3)")
    s.add_argument("--seed", type=int, default=None, help="trial construction seed (default 0)")


def graph_interp_command(args: argparse.Namespace) -> int:
    """Run ``spd-mcp graph-interp``; usage errors raise ValueError with the reason."""
    settings = settings_from_args(args)
    from spd_mcp.model.session import RunSession

    from .cli import count_progress
    from .graph_interp import graph_interp

    session = RunSession.load(args.run)
    with count_progress("graph-interp") as cb:
        seen: dict[str, tuple[int, int]] = {}

        def progress(kind: str, done: int, total: int) -> None:
            seen[kind] = (done, total)
            cb(sum(d for d, _ in seen.values()), 3 * total)

        out = asyncio.run(graph_interp(session, settings, limit=args.limit, progress=progress))
    print(out.message)
    if all(p.done for p in out.passes):
        return 0
    if args.limit is not None and all(p.ok + p.failed == p.components for p in out.passes):
        return 0  # a --limit selection that is complete
    print("not finished (budget, errors or a --limit selection); re-run to continue",
          file=sys.stderr)
    return 1


def score_labels_command(args: argparse.Namespace) -> int:
    """Run ``spd-mcp score-labels``; usage errors raise ValueError with the reason."""
    settings = settings_from_args(args)
    from spd_mcp.model.session import RunSession

    from .cli import count_progress
    from .scoring import ScoringConfig, score_labels

    upd = {k: v for k, v in (("n_trials", args.trials), ("seed", args.seed)) if v is not None}
    cfg = ScoringConfig(**upd)
    session = RunSession.load(args.run)
    with count_progress(f"score {args.method}") as cb:
        out = asyncio.run(score_labels(session, settings, method=args.method, config=cfg,
                                       limit=args.limit, progress=cb))
    print(out.message)
    if out.components == 0:
        print("no labels to score: run `spd-mcp label RUN` or `spd-mcp graph-interp RUN` first",
              file=sys.stderr)
        return 1
    return 0 if out.no_score == 0 else 1
