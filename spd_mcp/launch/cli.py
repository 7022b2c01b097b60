"""``spd-mcp investigate`` and the ``--slurm`` options of harvest / attributions (light imports)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_slurm_resources(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SLURM (with --slurm)")
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--time", help="SLURM time limit (e.g. 2:00:00)")
    g.add_argument("--gpus", type=int, help="GPUs per job")
    g.add_argument("--mem", help="memory per job (e.g. 16G)")
    g.add_argument("--dependency", help="job id (afterok) or a full SLURM dependency spec")


def add_investigate_parser(sub: argparse._SubParsersAction) -> None:
    iv = sub.add_parser(
        "investigate", help="launch agent investigations of a run (locally or on SLURM)",
        description='spd-mcp investigate RUN "question" | @question.md [--agents N] [--slurm]',
    )
    iv.add_argument("run", metavar="RUN", help="run directory or name")
    iv.add_argument("question", help="the question, or @FILE to read it from a file")
    iv.add_argument("--agent", default="claude",
                    help="claude (Claude Code, default), sdk (the built-in Messages-API agent: "
                         "ANTHROPIC_BASE_URL / ANTHROPIC_API_KEY), or cmd:'COMMAND' (any agent; "
                         "it finds SPD_MCP_CONFIG, SPD_MCP_QUESTION_FILE, ... in its environment)")
    iv.add_argument("--agents", type=int, default=1, help="independent investigations (default 1)")
    iv.add_argument("--max-turns", type=int, default=50, help="agent turns (default 50)")
    iv.add_argument("--model", default="opus", help="model (default opus; sdk: opus, sonnet, "
                    "haiku or a full model id)")
    iv.add_argument("--budget-usd", type=float, help="spending cap per agent (--max-budget-usd)")
    iv.add_argument("--root", type=Path, help="task directories root "
                    "(default $SPD_MCP_HOME/investigations)")
    iv.add_argument("--claude", help="claude executable (default $SPD_MCP_CLAUDE, then PATH)")
    iv.add_argument("--server-threads", type=int, help="torch threads of each server")
    iv.add_argument("--ready-timeout", type=float, default=300.0,
                    help="seconds to wait for each server (default 300)")
    iv.add_argument("--slurm", action="store_true", help="submit with sbatch instead")
    _add_slurm_resources(iv)


def add_slurm_to_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``--slurm`` (and resources) to the harvest and attributions subcommands."""
    for name in ("harvest", "attributions"):
        p = sub.choices.get(name)
        if p is None:
            continue
        p.add_argument("--slurm", action="store_true",
                       help="submit with sbatch (harvest: an array of --shards N, then a merge)")
        _add_slurm_resources(p)


def _slurm_opts(args: argparse.Namespace):
    from spd_mcp.launch.slurm import SlurmOptions

    return SlurmOptions(partition=args.partition, time=args.time, gpus=args.gpus, mem=args.mem,
                        dependency=args.dependency)


def investigate_command(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from spd_mcp.launch.local import LaunchError, LaunchOptions, read_question, run_local

    try:
        opts = LaunchOptions(
            run=args.run, question=read_question(args.question), agent=args.agent,
            agents=args.agents,
            max_turns=args.max_turns, model=args.model, budget_usd=args.budget_usd,
            root=args.root, claude=args.claude, server_threads=args.server_threads,
            ready_timeout_s=args.ready_timeout,
        )
        if args.slurm:
            from spd_mcp.launch.slurm import submit_investigations

            job = submit_investigations(opts, _slurm_opts(args))
            print(job)
            print(f"submitted job {job} ({opts.agents} agent(s))", file=sys.stderr)
            return 0
        return run_local(opts)
    except ValidationError as err:
        bad = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(f"bad investigate option ({bad})") from None
    except LaunchError as err:
        raise ValueError(str(err)) from None


def _harvest_flags(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for flag, attr in (("--tokens", "tokens"), ("--batch-size", "batch_size"),
                       ("--threshold", "threshold"), ("--window", "window"),
                       ("--n-examples", "n_examples"), ("--seed", "seed"),
                       ("--checkpoint-every", "checkpoint_every"), ("--device", "device")):
        value = getattr(args, attr, None)
        if value is not None:
            out += [flag, str(value)]
    return out


def slurm_command(args: argparse.Namespace) -> int | None:
    """Handle ``harvest/attributions --slurm``; None when --slurm was not given."""
    if not getattr(args, "slurm", False) or args.command not in ("harvest", "attributions"):
        return None
    from spd_mcp.launch.slurm import SlurmError, submit_command, submit_harvest

    try:
        if args.command == "attributions":
            argv = ["attributions", args.run]
            for flag, attr in (("--tokens", "tokens"), ("--batch-size", "batch_size"),
                               ("--device", "device"), ("--threads", "threads")):
                if getattr(args, attr, None) is not None:
                    argv += [flag, str(getattr(args, attr))]
            job = submit_command("attributions", argv, _slurm_opts(args))
            print(job)
            return 0
        target = list(args.target)
        if len(target) != 1 or args.shard:
            raise ValueError("usage: spd-mcp harvest RUN --slurm --shards N (no --shard, no merge)")
        shards = 1 if args.shards is None else args.shards
        if shards < 1:
            raise ValueError("--shards must be >= 1")
        import shutil

        if shutil.which("sbatch") is None:
            raise SlurmError("sbatch not found: is SLURM installed (scripts/slurm-local.sh up)?")
        from spd_mcp.harvest import prepare
        from spd_mcp.harvest.cli import config_from_args
        from spd_mcp.model.session import RunSession

        prepare(RunSession.load(target[0]), config_from_args(args))  # the plan, once
        array_job, merge_job = submit_harvest(target[0], shards, _harvest_flags(args),
                                              _slurm_opts(args), threads=args.threads)
        print(f"{array_job} {merge_job}")
        print(f"submitted {shards} shard(s) as array {array_job}, merge {merge_job}",
              file=sys.stderr)
        return 0
    except SlurmError as err:
        raise ValueError(str(err)) from None
