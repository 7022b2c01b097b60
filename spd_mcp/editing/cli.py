"""`spd-mcp edit`: create, train, measure, list and export component edits from the shell.

Edits are stored in the run's app database (the one `spd-mcp serve` uses), so an edit made here
is visible to `list_edits` / `generate(edit=ID)` over MCP and vice versa.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
ARROW = "=>"


def _measure_opts() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("measurement")
    g.add_argument("--probe", action="append", default=[], metavar="'PROMPT => TOKEN'",
                   help="a probe: P(TOKEN) after PROMPT before/after (repeatable)")
    g.add_argument("--group", action="append", default=[], metavar="NAME=TOK,TOK",
                   help="token group whose probability shift on held-out text is reported")
    g.add_argument("--generate", action="append", default=[], metavar="PROMPT",
                   help="greedy continuation, target vs edited (repeatable)")
    g.add_argument("--n-texts", type=int, default=64, help="held-out documents (default 64)")
    g.add_argument("--no-control", action="store_true", help="skip the random-components control")
    g.add_argument("--no-behaviours", action="store_true", help="skip planted-behaviour accuracy")
    g.add_argument("--json", action="store_true", help="print the measurement as JSON")
    return p


def add_edit_parser(sub: Any) -> None:
    e = sub.add_parser("edit", help="edit a run's target through its components "
                       "(scale / ablate, train rank-1 adapters, measure, export)")
    es = e.add_subparsers(dest="edit_command", required=True, metavar="EDIT_COMMAND")
    m = _measure_opts()

    sc = es.add_parser("scale", parents=[m], help="scale / ablate components (runtime edit)")
    sc.add_argument("run", help="run directory or name (e.g. tales)")
    sc.add_argument("scales", nargs="+", metavar="COMPONENT=SCALE",
                    help="e.g. 1.mlp.down:17=0 (ablate) or 0.attn.v:3=2 (boost)")
    sc.add_argument("--ci-threshold", type=float, default=None,
                    help="apply only where the component's natural CI exceeds this")
    sc.add_argument("--name", default=None)
    sc.add_argument("--measure", action="store_true", help="measure the edit right away")
    sc.add_argument("--export", type=Path, default=None, metavar="DIR",
                    help="bake the edit and write a standalone target checkpoint")

    tr = es.add_parser("train", parents=[m], help="train rank-1 adapters on components")
    tr.add_argument("run")
    tr.add_argument("--component", action="append", required=True, metavar="LAYER:C",
                    help="component whose vectors train (repeatable)")
    tr.add_argument("--raise", dest="raise_", action="append", default=[],
                    metavar="'PROMPT => TOKEN'", help="raise P(TOKEN) after PROMPT (repeatable)")
    tr.add_argument("--lower", action="append", default=[], metavar="'PROMPT => TOKEN'",
                    help="lower P(TOKEN) after PROMPT (repeatable)")
    tr.add_argument("--preserve", action="append", default=[], metavar="PROMPT",
                    help="prompt whose predictions must not change (repeatable)")
    tr.add_argument("--preserve-file", type=Path, default=None,
                    help="file with one preserve prompt per line")
    tr.add_argument("--vectors", choices=["read", "write", "both"], default="both")
    tr.add_argument("--mode", choices=["components", "full_matrix"], default="components")
    tr.add_argument("--steps", type=int, default=200)
    tr.add_argument("--lr", type=float, default=0.01)
    tr.add_argument("--kl-coeff", type=float, default=5.0)
    tr.add_argument("--n-kl-texts", type=int, default=64)
    tr.add_argument("--name", default=None)
    tr.add_argument("--measure", action="store_true", help="measure the edit right away")
    tr.add_argument("--export", type=Path, default=None, metavar="DIR")

    me = es.add_parser("measure", parents=[m], help="measure a stored edit")
    me.add_argument("run")
    me.add_argument("edit_id", type=int)

    ls = es.add_parser("list", help="stored edits of a run")
    ls.add_argument("run")

    ex = es.add_parser("export", help="bake a stored edit into a standalone target checkpoint")
    ex.add_argument("run")
    ex.add_argument("edit_id", type=int)
    ex.add_argument("--out", type=Path, required=True)
    for p in (sc, tr, me, ls, ex):
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _pair(text: str, flag: str) -> tuple[str, str]:
    if ARROW not in text:
        raise ValueError(f"{flag} {text!r}: write it as 'PROMPT => TOKEN'")
    prompt, token = (x.strip() for x in text.rsplit(ARROW, 1))
    if not prompt or not token:
        raise ValueError(f"{flag} {text!r}: both PROMPT and TOKEN are needed")
    return prompt, token


def _groups(items: list[str]) -> dict[str, list[str]]:
    out = {}
    for it in items:
        name, _, toks = it.partition("=")
        if not name or not toks:
            raise ValueError(f"--group {it!r}: write it as NAME=TOK,TOK")
        out[name] = [t for t in toks.split(",") if t]
    return out


def _book_call(session: Any, fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``fn(book)`` against the run's edit book (its app database, opened for the call)."""
    from spd_mcp.editing.book import EditBook
    from spd_mcp.service.state import app_store

    async def main() -> T:
        async with app_store(session) as store:
            return await fn(EditBook(store, session))

    return asyncio.run(main())


def _measure(session: Any, edit: Any, info: Any, params: dict[str, Any],
             args: argparse.Namespace) -> int:
    from rich.console import Console

    from spd_mcp.editing.book import control_recipe
    from spd_mcp.editing.measure import MeasureSettings, Probe, measure_edit

    settings = MeasureSettings(
        probes=[Probe(prompt=p, expected=t) for p, t in (_pair(x, "--probe") for x in args.probe)],
        token_groups=_groups(args.group), generation_prompts=args.generate,
        n_texts=args.n_texts, control=not args.no_control, behaviours=not args.no_behaviours)
    control = control_recipe(session, info, params)
    console = Console(stderr=True)
    with console.status("measuring (held-out text, probes, behaviours, control) ..."):
        m = measure_edit(session, edit, settings, control_edit=control)
    if args.json:
        print(json.dumps(m.model_dump(), indent=1))
        return 0
    _print_measurement(m)
    return 0


def _print_measurement(m: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    t = Table(title="edit vs target (held-out text)")
    for col in ("", "edit", "random control"):
        t.add_column(col)
    ctl = m.control
    rows = [
        ("KL nats/token", f"{m.text.kl:.5f}", f"{ctl.text.kl:.5f}" if ctl else "-"),
        ("KL outside groups", f"{m.text.kl_outside_groups}" if m.token_groups else "-",
         f"{ctl.text.kl_outside_groups}" if ctl and m.token_groups else "-"),
        ("perplexity change %", f"{m.text.ppl_change_pct:+.3f}",
         f"{ctl.text.ppl_change_pct:+.3f}" if ctl else "-"),
    ]
    if m.probes:
        rows.append(("probe P drop %", f"{m.probes.drop_pct:.2f}",
                     f"{ctl.probes.drop_pct:.2f}" if ctl and ctl.probes else "-"))
        rows.append(("probe accuracy", f"{m.probes.target_accuracy:.3f} → "
                     f"{m.probes.edited_accuracy:.3f}",
                     f"→ {ctl.probes.edited_accuracy:.3f}" if ctl and ctl.probes else "-"))
    for g in m.token_groups:
        rows.append((f"P({g.group}) shift", f"{g.shift:+.6f}", "-"))
    for r in rows:
        t.add_row(*r)
    c.print(t)
    if m.behaviours:
        b = Table(title="planted behaviours (top-1 accuracy)")
        for col in ("behaviour", "target", "edited"):
            b.add_column(col)
        for row in m.behaviours:
            b.add_row(row.behaviour, f"{row.target:.3f}", f"{row.edited:.3f}")
        c.print(b)
    for g in m.generations:
        c.print(f"[bold]{g.prompt}[/bold]\n  target: {g.target}\n  edited: {g.edited}")
    if m.concentration:
        c.print(f"concentration: {m.concentration}")
    for n in m.notes:
        c.print(f"note: {n}")


def _scales(args: argparse.Namespace) -> list[Any]:
    from spd_mcp.editing.edit import ComponentScale

    scales = []
    for item in args.scales:
        key, sep, val = item.rpartition("=")
        if not sep:
            raise ValueError(f"{item!r}: write it as COMPONENT=SCALE, e.g. 1.mlp.down:17=0")
        try:
            scale = float(val)
        except ValueError:
            raise ValueError(f"{item!r}: scale {val!r} is not a number") from None
        scales.append(ComponentScale(component=key, scale=scale, ci_threshold=args.ci_threshold))
    return scales


def _train(session: Any, args: argparse.Namespace) -> tuple[Any, bool]:
    """Train (or find) the edit the flags describe; prints the training report."""
    from rich.progress import Progress

    from spd_mcp.editing.book import EditBook
    from spd_mcp.editing.train import EditTarget, TrainSettings
    from spd_mcp.service.state import app_store

    targets = [EditTarget(prompt=p, token=t) for p, t in
               (_pair(x, "--raise") for x in args.raise_)]
    targets += [EditTarget(prompt=p, token=t, direction="lower") for p, t in
                (_pair(x, "--lower") for x in args.lower)]
    if not targets:
        raise ValueError("give at least one --raise or --lower 'PROMPT => TOKEN'")
    preserve = list(args.preserve)
    if args.preserve_file is not None:
        preserve += [ln.strip() for ln in args.preserve_file.read_text().splitlines()
                     if ln.strip()]
    settings = TrainSettings(vectors=args.vectors, mode=args.mode, steps=args.steps,
                             lr=args.lr, kl_coeff=args.kl_coeff, n_kl_texts=args.n_kl_texts)

    async def in_place(fn: Callable[[], T]) -> T:
        return fn()

    async def main() -> tuple[Any, bool, Any]:
        async with app_store(session) as store:
            with Progress(transient=True) as bar:
                task = bar.add_task("training", total=settings.steps)
                return await EditBook(store, session).train(
                    args.component, targets, settings, preserve=preserve, name=args.name,
                    run=in_place, progress=lambda done, total: bar.update(task, completed=done))

    info, cached, report = asyncio.run(main())
    if report is not None:
        for r in report.targets:
            print(f"  P({r.token}) {r.before:.4f} → {r.after:.4f}   top-1 {r.top1_before} → "
                  f"{r.top1_after}   | {r.prompt[-60:]}", file=sys.stderr)
        print(f"trained {report.n_trainable} scalars in {report.seconds:.1f} s; KL on training "
              f"text {report.kl_train_text_after:.5f}", file=sys.stderr)
    return info, cached


def edit_command(args: argparse.Namespace) -> int:
    import torch

    from spd_mcp.editing.bake import export_baked
    from spd_mcp.model.session import RunSession

    if args.threads:
        torch.set_num_threads(args.threads)
    session = RunSession.load(args.run)
    cmd = args.edit_command
    if cmd == "list":
        infos = _book_call(session, lambda b: b.list(200))
        if not infos:
            print("no edits stored for this run")
        for i in infos:
            print(f"{i.edit_id:>4}  {i.type:<5}  {i.name or '':<16}  {i.description}")
        return 0
    if cmd in ("measure", "export"):
        edit, info, params = _book_call(session, lambda b: b.get(args.edit_id))
        if cmd == "export":
            print(export_baked(session, edit, args.out, note=info.model_dump()))
            return 0
        return _measure(session, edit, info, params, args)
    if cmd == "scale":
        scales = _scales(args)
        info, cached = _book_call(session, lambda b: b.scale(scales, name=args.name))
    else:
        info, cached = _train(session, args)
    edit, info, params = _book_call(session, lambda b: b.get(info.edit_id))
    return _finish(session, edit, info, params, cached, args)


def _finish(session: Any, edit: Any, info: Any, params: dict[str, Any], cached: bool,
            args: argparse.Namespace) -> int:
    from spd_mcp.editing.bake import export_baked

    print(f"edit {info.edit_id}{' (already stored)' if cached else ''}: {info.description}")
    if args.export is not None:
        print(export_baked(session, edit, args.export, note=info.model_dump()))
    if args.measure:
        return _measure(session, edit, info, params, args)
    return 0
