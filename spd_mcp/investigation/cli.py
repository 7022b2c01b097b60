"""``spd-mcp investigations list|show|tail`` and ``spd-mcp export-graph`` (no torch import)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .taskdir import Event, TaskDir, investigations_root, list_tasks


def add_investigation_parsers(sub: Any) -> None:
    inv = sub.add_parser("investigations", help="list, show or tail investigation task dirs")
    isub = inv.add_subparsers(dest="inv_command", required=True, metavar="INV_COMMAND")
    ls = isub.add_parser("list", help="a table of investigations, newest first")
    ls.add_argument("--root", type=Path, help="default: $SPD_MCP_HOME/investigations")
    sh = isub.add_parser("show", help="task info, summary, explanations and artifacts")
    sh.add_argument("id", help="task id (or a task directory path)")
    sh.add_argument("--root", type=Path)
    tl = isub.add_parser("tail", help="print events (with --follow, keep printing new ones)")
    tl.add_argument("id", help="task id (or a task directory path)")
    tl.add_argument("--root", type=Path)
    tl.add_argument("--follow", "-f", action="store_true", help="poll for new events")
    tl.add_argument("-n", type=int, default=20, help="last N events first (default 20)")
    tl.add_argument("--interval", type=float, default=0.5, help=argparse.SUPPRESS)

    ex = sub.add_parser("export-graph", help="export a graph artifact to another format")
    ex.add_argument("artifact", type=Path, help="artifacts/<id>.json of a task directory")
    ex.add_argument("--format", default="circuit-tracer", choices=["circuit-tracer"])
    ex.add_argument("--out", type=Path, help="output file (default: stdout)")


def _resolve(ident: str, root: Path | None) -> TaskDir:
    p = Path(ident)
    if (p / "task.json").is_file():
        return TaskDir(p)
    base = root or investigations_root()
    td = TaskDir(base / ident)
    if td.exists():
        return td
    matches = [t for t in list_tasks(base) if t.id.startswith(ident)]
    if len(matches) == 1:
        return TaskDir(matches[0].path)
    raise ValueError(f"no investigation {ident!r} under {base}"
                     + (f" ({len(matches)} ids start with it)" if matches else ""))


def _age(ts: str) -> str:
    try:
        then = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return "?"
    s = max(0, int((datetime.now(UTC) - then).total_seconds()))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _list(root: Path | None) -> int:
    from rich.console import Console
    from rich.table import Table

    tasks = list_tasks(root)
    table = Table(title=f"investigations in {root or investigations_root()}")
    for col in ("id", "status", "title", "question", "last event", "age"):
        table.add_column(col)
    for t in tasks:
        td = TaskDir(t.path)
        s = td.summary()
        evs = td.events()
        last = f"{evs[-1].type}: {_short(evs[-1].message, 30)}" if evs else ""
        table.add_row(t.id, s.status, _short(s.title, 30), _short(t.question, 40), last,
                      _age(evs[-1].ts if evs else t.created))
    Console().print(table)
    return 0


def _show(td: TaskDir) -> int:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    info, s = td.info(), td.summary()
    con.print(f"[bold]{info.id}[/bold]  run={info.run}  model={info.model}  "
              f"created={info.created}\n{td.path}")
    con.print(f"[bold]question:[/bold] {info.question}")
    con.print(f"[bold]status:[/bold] {s.status}  [bold]title:[/bold] {s.title}")
    if s.summary:
        con.print(s.summary)
    exps = td.explanations()
    t = Table(title=f"explanations ({len(exps)})")
    for col in ("id", "behaviour", "components", "confidence"):
        t.add_column(col)
    for e in exps:
        comps = ", ".join(c.get("key", "?") for c in e.get("components", []))
        t.add_row(str(e.get("explanation_id")), _short(str(e.get("behaviour")), 50),
                  _short(comps, 50), str(e.get("confidence")))
    con.print(t)
    arts = td.artifacts()
    con.print(f"[bold]artifacts ({len(arts)}):[/bold] " + ", ".join(arts))
    con.print(f"log entries: {td.n_log_entries()}   events: {len(td.events())}")
    return 0


def _fmt(ev: Event) -> str:
    return f"{ev.ts}  {ev.source:<8} {ev.type:<14} {ev.message}"


def _tail(td: TaskDir, n: int, follow: bool, interval: float) -> int:
    seen = 0
    events = td.events()
    for ev in events[-n:] if n > 0 else []:
        print(_fmt(ev), flush=True)
    seen = len(events)
    while follow:
        time.sleep(interval)
        events = td.events()
        for ev in events[seen:]:
            print(_fmt(ev), flush=True)
        seen = len(events)
    return 0


def _export(path: Path, fmt: str, out: Path | None) -> int:
    from .artifacts import to_circuit_tracer

    art = json.loads(path.read_text())
    assert fmt == "circuit-tracer"
    data = json.dumps(to_circuit_tracer(art), indent=1)
    if out is None:
        sys.stdout.write(data + "\n")
    else:
        out.write_text(data)
        print(f"wrote {out}", file=sys.stderr)
    return 0


def investigation_command(args: argparse.Namespace) -> int:
    if args.command == "export-graph":
        if not args.artifact.is_file():
            raise ValueError(f"artifact file not found: {args.artifact}")
        return _export(args.artifact, args.format, args.out)
    if args.inv_command == "list":
        return _list(args.root)
    td = _resolve(args.id, args.root)
    if args.inv_command == "show":
        return _show(td)
    return _tail(td, args.n, args.follow, args.interval)
