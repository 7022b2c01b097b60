"""The ``spd-mcp`` command. Arguments are checked before torch is imported."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spd-mcp", description="SPD decompositions and the tools to investigate them."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("decompose", help="decompose a target model from a YAML/JSON config")
    d.add_argument("config", type=Path)
    d.add_argument("--out", type=Path, help="run directory (default: $SPD_MCP_HOME/runs/NAME)")
    d.add_argument("--device", default="auto", help="cpu | cuda | auto (default: auto)")
    d.add_argument("--steps", type=int, help="override the config's SPD steps")
    d.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    d.add_argument("--threads", type=int, help="torch CPU threads (default: $SPD_MCP_THREADS)")
    d.add_argument("--nproc", type=int, default=1,
                   help="processes (per node) training data-parallel: gloo on CPU, nccl on GPUs")
    d.add_argument("--checkpoint-every", type=int, help="write a checkpoint every K steps")
    d.add_argument("--resume", action="store_true",
                   help="continue from the run's checkpoint if there is one")
    d.add_argument("--slurm", action="store_true",
                   help="submit with sbatch: torchrun on --nodes nodes, requeued jobs resume")
    d.add_argument("--nodes", type=int, default=1, help="SLURM nodes (with --slurm)")
    from spd_mcp.launch.cli import _add_slurm_resources  # light

    _add_slurm_resources(d)

    z = sub.add_parser("zoo", help="built-in targets")
    zsub = z.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    zsub.add_parser("list", help="list built-in targets")
    zb = zsub.add_parser("build", help="train a zoo target and decompose it")
    zb.add_argument("name")
    zb.add_argument("--out", type=Path, help="run directory (default: $SPD_MCP_HOME/runs/NAME)")
    zb.add_argument("--device", default="auto", help="cpu | cuda | auto (default: auto)")
    zb.add_argument("--steps", type=int, help="SPD steps (default: the zoo config's)")
    zb.add_argument("--target-steps", type=int, help="target training steps (default: zoo's)")
    zb.add_argument("--seed", type=int, help="override the config seed")
    zb.add_argument("--target-kwarg", action="append", default=[], metavar="KEY=VALUE",
                    help="target constructor argument (repeatable; VALUE is JSON or a string), "
                    "e.g. grammar=v1 for the tales corpus")
    zb.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    zb.add_argument("--threads", type=int, help="torch CPU threads (default: the target's)")
    zb.add_argument("--print-config", action="store_true", help="print the config and exit")

    zs = zsub.add_parser("ship", help="(maintainers) copy a run into the package with checksums")
    zs.add_argument("run", help="run directory or name")
    zs.add_argument("name", help="name of the shipped run (e.g. tales)")

    e = sub.add_parser("evaluate", help="evaluate a run (ground truth for toys)")
    e.add_argument("run", help="run directory or name")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: cpu)")
    e.add_argument("--strict", action="store_true",
                   help="exit 1 when the validity verdict fails a check")

    sub.add_parser("runs", help="list local and shipped runs")

    sv = sub.add_parser("serve", help="serve a run over MCP (stdio, or streamable HTTP)")
    sv.add_argument("--run", default="tales", help="run directory or name (default: tales)")
    sv.add_argument("--http", action="store_true", help="streamable HTTP instead of stdio")
    sv.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback)")
    sv.add_argument("--port", type=int, default=8765, help="HTTP port (0 = OS-assigned)")
    sv.add_argument("--token", default=os.environ.get("SPD_MCP_TOKEN") or None,
                    help="require 'Authorization: Bearer TOKEN' (mandatory off loopback; default "
                    "$SPD_MCP_TOKEN, which keeps the token out of the process list)")
    sv.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: cpu)")
    sv.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sv.add_argument("--no-worker", action="store_true",
                    help="run heavy analyses in the server process, not a worker process "
                    "(also SPD_MCP_WORKER=0)")
    sv.add_argument("--no-auto-prepare", action="store_true",
                    help="do not build a missing harvest / attributions on first use")
    sv.add_argument("--job-after", type=float, default=None, metavar="SECONDS",
                    help="a long call still running after SECONDS answers with a job handle the "
                    "agent polls with get_job (default $SPD_MCP_JOB_AFTER_S, else 20; 0 = always)")
    sv.add_argument("--task-dir", type=Path, default=None,
                    help="investigation task directory the investigation tools write to")

    pr = sub.add_parser("prepare", help="build a run's harvest and dataset attributions "
                        "(default settings; finished stages are reused)")
    pr.add_argument("run", nargs="?", default="tales", help="run directory or name")
    pr.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    from spd_mcp.harvest.cli import add_harvest_parser  # light: no torch import

    add_harvest_parser(sub)

    from spd_mcp.attributions.cli import add_attributions_parser  # light: no torch import

    add_attributions_parser(sub)
    from spd_mcp.interp.cli import add_label_parser  # light: no torch import

    add_label_parser(sub)
    from spd_mcp.interp.cli_graph import add_graph_interp_parsers  # light: no torch import

    add_graph_interp_parsers(sub)
    from spd_mcp.investigation.cli import add_investigation_parsers  # light: no torch import

    add_investigation_parsers(sub)
    from spd_mcp.launch.cli import add_investigate_parser, add_slurm_to_parsers  # light

    add_investigate_parser(sub)
    add_slurm_to_parsers(sub)
    from spd_mcp.editing.cli import add_edit_parser  # light: no torch import

    add_edit_parser(sub)
    from spd_mcp.demo import add_demo_parser  # light: no torch / mcp import

    add_demo_parser(sub)
    from spd_mcp.benchrun import add_bench_parser  # light: no torch / mcp import

    add_bench_parser(sub)
    from spd_mcp.viewer.cli import add_view_parser  # light: no torch / web import

    add_view_parser(sub)
    from spd_mcp.model.goodfire.cli import add_import_parser  # light: no torch import

    add_import_parser(sub)
    return p


def _fail(msg: str) -> int:
    print(f"spd-mcp: error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "decompose" and not args.config.is_file():
        return _fail(f"config file not found: {args.config}")
    if getattr(args, "device", "cpu") not in {"cpu", "cuda", "auto"} and not str(
        args.device
    ).startswith("cuda:"):
        return _fail(f"--device must be cpu, cuda or auto, got {args.device!r}")
    if getattr(args, "steps", None) is not None and args.steps < 0:
        return _fail("--steps must be >= 0")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        return _fail("--threads must be >= 1")
    try:
        device = _device_of(args)
        if device is None:
            return _dispatch(args)
        with _device_held(device, _job_name(args)):
            return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ValueError as err:  # config, target, run and device errors carry readable messages
        return _fail(str(err))
    except KeyError as err:
        return _fail(str(err))


DEVICE_COMMANDS = {"decompose", "zoo", "evaluate", "prepare", "harvest", "attributions"}
"""Commands that compute on a device locally: they hold its machine-wide lock while they run
(servers' heavy calls take the same lock), unless they only submit to SLURM or print."""


def _device_of(args: argparse.Namespace) -> str | None:
    """The device a local CLI job computes on, or None when it holds none."""
    if args.command not in DEVICE_COMMANDS or getattr(args, "slurm", False):
        return None
    if "LOCAL_RANK" in os.environ:  # a torchrun worker: the command that started it holds it
        return None
    if args.command == "zoo" and (args.zoo_command != "build" or args.print_config):
        return None
    from spd_mcp.model.decompose import resolve_device

    return resolve_device(getattr(args, "device", None) or "cpu")


def _job_name(args: argparse.Namespace) -> str:
    what = getattr(args, "name", None) or getattr(args, "run", None) or getattr(
        args, "config", None)
    return f"spd-mcp {args.command}" + (f" {what}" if what else "")


@contextmanager
def _device_held(device: str, job: str) -> Iterator[None]:
    """Hold ``device``'s machine-wide lock (FIFO behind servers and other jobs), saying on
    stderr when the job has to wait and for whom."""
    from spd_mcp.service.devlock import DeviceLock, enabled

    lock = DeviceLock(device)
    if enabled():
        st = lock.status()
        first = st.holder or (st.waiting[0] if st.waiting else None)
        if first is not None:
            print(f"waiting for the {lock.device} device lock ({first.who()} "
                  f"{'holds' if st.holder else 'is first in line for'} it; "
                  f"~{lock.estimated_wait(st):.0f} s by its estimate; SPD_MCP_DEVICE_LOCK=0 "
                  "turns the lock off)", file=sys.stderr, flush=True)
    hold = lock.acquire(job)
    assert hold is not None  # no abandon callback
    with hold:
        yield


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "bench":
        from spd_mcp.benchrun import bench_command

        return bench_command(args)
    if args.command == "demo":
        from spd_mcp.demo import demo_command

        return demo_command(args)
    if args.command == "view":
        from spd_mcp.viewer.cli import view_command

        return view_command(args)
    if args.command == "edit":
        from spd_mcp.editing.cli import edit_command

        return edit_command(args)
    if args.command == "import":
        from spd_mcp.model.goodfire.cli import import_command

        return import_command(args)
    if args.command == "investigate":
        from spd_mcp.launch.cli import investigate_command

        return investigate_command(args)
    if getattr(args, "slurm", False):
        from spd_mcp.launch.cli import slurm_command

        done = slurm_command(args)
        if done is not None:
            return done
    if args.command == "zoo" and args.zoo_command == "list":
        return _zoo_list()
    if args.command == "runs":
        return _runs()
    if args.command == "zoo" and args.zoo_command == "ship":
        from spd_mcp.model.run_io import ship_run
        from spd_mcp.paths import shipped_runs_dir

        print(ship_run(Path(args.run), shipped_runs_dir() / args.name))
        return 0
    if args.command == "zoo":
        return _zoo_build(args)
    if args.command == "decompose":
        return _decompose(args)
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "prepare":
        return _prepare(args)
    if args.command == "harvest":
        from spd_mcp.harvest.cli import harvest_command

        return harvest_command(args)
    if args.command == "attributions":
        from spd_mcp.attributions.cli import attributions_command

        return attributions_command(args)
    if args.command == "label":
        from spd_mcp.interp.cli import label_command

        return label_command(args)
    if args.command in ("graph-interp", "score-labels"):
        from spd_mcp.interp.cli_graph import graph_interp_command, score_labels_command

        fn = graph_interp_command if args.command == "graph-interp" else score_labels_command
        return fn(args)
    if args.command in ("investigations", "export-graph"):
        from spd_mcp.investigation.cli import investigation_command

        return investigation_command(args)
    if args.command == "serve":
        from spd_mcp.model.decompose import resolve_device
        from spd_mcp.server import check_bind, serve

        if args.http:
            check_bind(args.host, args.token)
        if not 0 <= args.port < 65536:
            return _fail(f"--port must be 0..65535, got {args.port}")
        from spd_mcp.service.jobs import after_s_from_env

        try:
            after_s_from_env(args.job_after)
        except ValueError as e:
            return _fail(f"--job-after: {e}")
        serve(args.run, http=args.http, host=args.host, port=args.port, token=args.token,
              device=resolve_device(args.device), threads=args.threads,
              auto_prepare=not args.no_auto_prepare, task_dir=args.task_dir,
              worker=False if args.no_worker else None, job_after_s=args.job_after)
        return 0
    raise AssertionError(args.command)


def _prepare(args: argparse.Namespace) -> int:
    """Harvest + dataset attributions with default settings (what the tools and demo read)."""
    import time

    import torch

    from spd_mcp.attributions import compute_attributions
    from spd_mcp.harvest import harvest
    from spd_mcp.harvest.cli import token_progress
    from spd_mcp.model.session import RunSession

    if args.threads:
        torch.set_num_threads(args.threads)
    session = RunSession.load(args.run)
    t0 = time.perf_counter()
    with token_progress("harvest") as cb:
        h = harvest(session, progress=cb)
    print(f"harvest: {h.status} ({h.n_tokens:,} tokens) {h.path}", file=sys.stderr)
    t1 = time.perf_counter()
    with token_progress("attributions") as cb:
        a = compute_attributions(session, progress=cb)
    print(f"attributions: {a.status} ({a.n_tokens:,} tokens) {a.path}", file=sys.stderr)
    t2 = time.perf_counter()
    print(f"prepared {session.run.name}: harvest {t1 - t0:.1f} s, attributions {t2 - t1:.1f} s",
          file=sys.stderr)
    return 0


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _zoo_list() -> int:
    from rich.console import Console
    from rich.table import Table

    from spd_mcp.model.zoo import zoo_class, zoo_names

    table = Table("name", "description", title="spd-mcp zoo")
    for name in zoo_names():
        try:
            desc = zoo_class(name).description
        except ImportError as err:
            desc = f"(unavailable: {err})"
        table.add_row(name, desc)
    Console().print(table)
    return 0


def _runs() -> int:
    from rich.console import Console
    from rich.table import Table

    from spd_mcp.model.run_io import list_runs, read_meta

    table = Table("name", "created", "layers", "path", title="runs")
    for name, path in list_runs():
        try:
            meta = read_meta(path)
        except Exception as err:  # a broken run is listed, not fatal
            table.add_row(name, "?", f"unreadable: {err}", str(path))
            continue
        table.add_row(name, meta.get("created_at", "?"), str(len(meta["layers"])), str(path))
    Console().print(table)
    return 0


def _default_out(name: str) -> Path:
    from spd_mcp.paths import runs_dir

    return runs_dir() / name


def _run_decompose(config: Any, *, out: Path, device: str, target_steps: int | None,
                   overwrite: bool, threads: int | None, checkpoint_every: int | None = None,
                   resume: bool = False) -> Path:
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from spd_mcp.model.decompose import decompose

    console = _console()
    plain = not console.is_terminal  # logs and CI: a line every 10% instead of a live bar

    printed: dict[str, int] = {}

    def log(kind: str, step: int, total: int, info: str) -> None:
        decile = step * 10 // max(1, total)
        if plain and decile > printed.get(kind, -1):
            printed[kind] = decile
            console.print(f"{kind} {step}/{total} {info}", highlight=False)

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=plain,
    ) as progress:
        tgt = progress.add_task("target", total=None, info="")
        spd = progress.add_task("SPD", total=config.steps, info="", visible=False)

        def on_target(step: int, total: int, loss: float) -> None:
            progress.update(tgt, completed=step, total=total, info=f"loss {loss:.4g}")
            log("target", step, total, f"loss {loss:.4g}")

        def on_spd(step: int, total: int, latest: dict[str, float]) -> None:
            progress.update(tgt, visible=False)
            info = " ".join(f"{k}={v:.3g}" for k, v in latest.items() if k == "total")
            progress.update(spd, completed=step, total=total, info=info, visible=True)
            log("SPD", step, total, info)

        return decompose(
            config, out=out, device=device, target_steps=target_steps, reporter=on_spd,
            target_reporter=on_target, overwrite=overwrite, threads=threads,
            checkpoint_every=checkpoint_every, resume=resume,
        )


def _decompose(args: argparse.Namespace) -> int:
    from spd_mcp.model.config import load_config

    for flag, value in (("--nproc", args.nproc), ("--nodes", args.nodes),
                        ("--checkpoint-every", args.checkpoint_every)):
        if value is not None and value < 1:
            return _fail(f"{flag} must be >= 1")
    if args.nodes > 1 and not args.slurm:
        return _fail("--nodes needs --slurm")
    if args.gpus is not None:
        return _fail("--gpus: decompose --slurm takes --nproc GPUs per node (--device cpu: none)")
    config = load_config(args.config)
    if args.steps is not None:
        config = config.model_copy(update={"steps": args.steps})
    out = args.out or _default_out(config.name)
    if args.nproc * args.nodes > 1:  # fail here, not in every process (or after the queue)
        from spd_mcp.model.distributed import check_config

        check_config(config, args.nproc * args.nodes)
    if args.slurm:
        from spd_mcp.launch.cli import _slurm_opts
        from spd_mcp.launch.slurm import submit_decompose

        argv = _decompose_argv(args, out)
        if "--resume" not in argv:
            argv.append("--resume")  # a preempted, requeued job continues from its checkpoint
        print(submit_decompose(argv, _slurm_opts(args), nodes=args.nodes, nproc=args.nproc,
                               gpus=args.device != "cpu"))
        return 0
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:  # not yet inside torchrun
        import subprocess

        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc-per-node", str(args.nproc), "-m", "spd_mcp.cli",
                               *_decompose_argv(args, out)], check=False).returncode
    if os.environ.get("RANK", "0") != "0":  # a data-parallel worker: rank 0 reports and saves
        from spd_mcp.model.decompose import decompose

        decompose(config, out=out, device=args.device, overwrite=args.overwrite,
                  threads=args.threads, checkpoint_every=args.checkpoint_every,
                  resume=args.resume)
        return 0
    path = _run_decompose(config, out=out, device=args.device, target_steps=None,
                          overwrite=args.overwrite, threads=args.threads,
                          checkpoint_every=args.checkpoint_every, resume=args.resume)
    print(path)
    return 0


def _decompose_argv(args: argparse.Namespace, out: Path) -> list[str]:
    """``decompose`` arguments for the processes torchrun starts (absolute paths)."""
    argv = ["decompose", str(args.config.resolve()), "--out", str(out.resolve()),
            "--device", args.device]
    for flag, value in (("--steps", args.steps), ("--threads", args.threads),
                        ("--checkpoint-every", args.checkpoint_every)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + [f for f, on in (("--overwrite", args.overwrite), ("--resume", args.resume))
                   if on]


def _zoo_build(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from spd_mcp.model.config import parse_config
    from spd_mcp.model.zoo import get_entry

    try:
        kwargs = _target_kwargs(args.target_kwarg)
        entry = get_entry(args.name, **kwargs)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                             for err in e.errors())
        return _fail(f"--target-kwarg for {args.name}: {problems}")
    except ValueError as e:
        return _fail(f"--target-kwarg: {e}")
    cfg = entry.default_config()
    if kwargs:
        cfg["target"]["kwargs"] = {**cfg["target"].get("kwargs", {}), **kwargs}
    if args.steps is not None:
        cfg["steps"] = args.steps
    if args.seed is not None:
        cfg["seed"] = args.seed
    config = parse_config(cfg, source=f"zoo config for {args.name}")
    if args.print_config:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        return 0
    out = args.out or _default_out(args.name)
    path = _run_decompose(config, out=out, device=args.device, target_steps=args.target_steps,
                          overwrite=args.overwrite, threads=args.threads)
    print(path)
    return 0


def _target_kwargs(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; VALUE is read as JSON where it parses (numbers, booleans), else text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _evaluate(args: argparse.Namespace) -> int:
    from spd_mcp.model.decompose import resolve_device
    from spd_mcp.model.run_io import load_run
    from spd_mcp.model.validity import save_validity, validity_of_run

    run = load_run(args.run, device=resolve_device(args.device))
    entry = run.target.entry
    result = entry.evaluate_run(run) if entry is not None else None
    if result is None:
        from spd_mcp.model.evaluate import evaluate_run

        result = evaluate_run(run)
    validity = validity_of_run(run)  # fresh, every time: evaluation never trusts a cache
    save_validity(run, validity)  # what get_model_info reports for this run from now on
    result["validity"] = validity.model_dump(mode="json")
    if args.json:
        print(json.dumps(result))
    else:
        _print_eval(result)
        _print_validity(validity)
    return 1 if args.strict and not validity.ok else 0


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _print_eval(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # logs and pipes: do not truncate the column headers
    if "behaviours" in result:
        bt = Table("behaviour", "target top-1", "CI top-1", "stochastic top-1",
                   title="planted behaviours (held-out probes)")
        for name, row in result["behaviours"].items():
            bt.add_row(name, *(_fmt(row[k]) for k in ("target_top1", "ci_top1", "stochastic_top1")))
        console.print(bt)
    layers = result["layers"]
    cols = sorted({k for row in layers.values() for k in row}, key=_COL_ORDER.index)
    table = Table("layer", *cols, title=f"evaluation of {result.get('run', '')}")
    for name, row in layers.items():
        table.add_row(name, *(_fmt(row.get(c, "")) for c in cols))
    console.print(table)
    extras = {k: v for k, v in result.items()
              if k not in {"layers", "behaviours", "run", "validity"}}
    console.print(" ".join(f"{k}={_fmt(v)}" for k, v in extras.items()))


def _print_validity(v: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    rt = Table("masks", "divergence", "÷ all off", "max", title=f"validity: reconstruction on "
               f"{v.data} ({v.output_loss}; all components off: {v.zero_divergence:.4g})")
    for k, r in v.recon.items():
        limit = getattr(v.thresholds, k)
        mark = "" if r.ratio <= limit else "  ✘"
        rt.add_row(k, f"{r.divergence:.4g}", f"{r.ratio:.4g}{mark}", f"{limit:g}")
    console.print(rt)
    mt = Table("matrix", "C", "alive", "dead", "L0", "L0 %", "‖Δ‖/‖W‖", "firing spectrum",
               "duplicates", title="validity: per matrix")
    for m in v.matrices:
        spectrum = " ".join(f"{k}:{n}" for k, n in m.spectrum.items() if n)
        mt.add_row(m.layer, str(m.C), str(m.alive), str(m.dead), f"{m.l0:.2f}",
                   f"{100 * m.l0_frac:.1f}", f"{m.delta_ratio:.4f}", spectrum,
                   ", ".join(f"{a}~{b}" for a, b in m.duplicates) or "-")
    console.print(mt)
    print(f"verdict: {v.verdict}")


_COL_ORDER = ["C", "alive", "expected_alive", "mmcs", "ml2r", "mmcs_full", "l0", "delta_ratio"]


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
