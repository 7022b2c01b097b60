"""``spd-mcp bench``: run benchmark tasks as investigations through the MCP server, grade them.

Each task (× repeat) gets its own task directory and its own server over stdio; the agent answers
with ``save_explanation`` and ``set_investigation_summary``; the causal grader
(:mod:`spd_mcp.bench.grade`) re-checks the answer on held-out probes. Results go to
``results.jsonl`` (one graded run per line, appended as each finishes) and ``summary.json`` in the
output directory; ``bench report`` prints them as a table and writes ``results.md``.

Agents: ``scripted`` (built in, LLM-free: the behaviour's example prompt → ``sweep_ablation``'s
greedy necessary set → explanation), ``topk`` (the baseline "top-k of
``search_components(output_token)``"). Claude Code, the SDK agent and ``cmd:`` agents are not
built yet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spd_mcp.bench.results import RunRecord, read_results, summarize
from spd_mcp.errors import OperationError

if TYPE_CHECKING:  # the CLI imports this module to build its parser: keep that light
    from mcp import ClientSession

    from spd_mcp.bench.grade import GradeResult
    from spd_mcp.bench.tasks import BenchTask

AGENTS = ("scripted", "topk")
TOPK = 8


class BenchError(OperationError):
    """A tool call of a built-in agent failed."""


class _Calls:
    """Tool calls through one MCP session, counted."""

    def __init__(self, session: ClientSession) -> None:
        self.session, self.n, self.errors = session, 0, 0

    async def __call__(self, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        self.n += 1
        res = await self.session.call_tool(tool, args)
        if res.is_error:
            self.errors += 1
            text = " ".join(getattr(c, "text", "") for c in res.content)
            raise BenchError(f"{tool} failed: {text}")
        return dict(res.structured_content or {})


async def _example(call: _Calls, behaviour: str) -> tuple[str, str]:
    info = await call("get_model_info", {})
    for b in info.get("planted_behaviours") or []:
        if b["name"] == behaviour:
            return b["example_prompt"], b["expected_next_token"]
    raise BenchError(f"the run has no planted behaviour {behaviour!r}")


async def scripted_agent(call: _Calls, task: BenchTask) -> None:
    """The behaviour's example → a greedy necessary set (sweep_ablation) → explanation."""
    prompt, label = await _example(call, task.behaviour)
    r = await call("sweep_ablation", {"text": prompt, "label_token": label, "greedy_steps": 8,
                                      "stop_prob": 0.05, "random_controls": 5, "top": 5})
    comps = r["necessary_set"] or [e["component"] for e in r["ranked"][:1]]
    final = r["greedy"][-1]["ablated"]["prob"] if r["greedy"] else r["target"]["prob"]
    await call("save_explanation", {
        "behaviour": f"{task.behaviour}: predicting '{label}' after the example prompt",
        "components": [{"key": k, "role": "in the greedy necessary set for the example"}
                       for k in comps],
        "evidence": [{"type": "ablation", "value": final,
                      "description": f"ablating the set everywhere takes P({label}) from "
                                     f"{r['target']['prob']:.3f} to {final:.4f}"}],
        "confidence": 0.5,
        "limitations": ["scripted baseline: one example prompt, no specificity check"]})
    await call("set_investigation_summary", {
        "title": f"{task.id} (scripted)", "status": "completed",
        "summary": f"greedy necessary set of {len(comps)} components on one example"})


async def topk_agent(call: _Calls, task: BenchTask) -> None:
    """Baseline: the top components by output token (search_components) as the answer."""
    _, label = await _example(call, task.behaviour)
    s = await call("search_components", {"output_token": label, "limit": TOPK})
    comps = [c["key"] for c in s["components"]]
    await call("save_explanation", {
        "behaviour": f"{task.behaviour}: predicting '{label}'",
        "components": [{"key": k, "role": f"ranked by search_components('{label}')"}
                       for k in comps],
        "evidence": [{"type": "dataset", "description": "first-order effect ranking"}],
        "confidence": 0.3})
    await call("set_investigation_summary", {"title": f"{task.id} (top-k)", "summary": "top-k",
                                             "status": "completed"})


async def _investigate(task: BenchTask, agent: str, task_dir: Path, threads: int) -> _Calls:
    from mcp import ClientSession, StdioServerParameters, stdio_client

    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "spd_mcp.cli", "serve", "--run", task.run, "--task-dir", str(task_dir),
              "--threads", str(threads)],
        env=dict(os.environ))
    with open(task_dir / "server.log", "a") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            calls = _Calls(session)
            fn = scripted_agent if agent == "scripted" else topk_agent
            try:
                await fn(calls, task)
            except BenchError as e:  # the run is graded as it stands (likely invalid)
                (task_dir / "agent_error.txt").write_text(str(e))
            return calls


def _record(task: BenchTask, repeat: int, agent: str, g: GradeResult, calls: _Calls,
            agent_s: float, task_dir: Path) -> RunRecord:
    sc = g.scores
    return RunRecord(
        task_id=task.id, repeat=repeat, agent=agent, outcome=g.outcome, success=g.success,
        reason=g.reason, components=g.components,
        own_drop=round(sc.own.drop, 4) if sc else None,
        max_other_drop=round(max((o.drop for o in sc.others), default=0.0), 4) if sc else None,
        random_drop=round(sc.random.mean_drop, 4) if sc else None,
        tool_calls=calls.n, tool_errors=calls.errors, agent_seconds=round(agent_s, 2),
        grade_seconds=g.seconds, task_dir=str(task_dir))


def run_bench(tasks: list[BenchTask], agent: str, out: Path, *, repeats: int = 1,
              threads: int = 1, log: Any = print) -> list[RunRecord]:
    """Run, grade and record every task × repeat; results.jsonl and summary.json in ``out``."""
    from spd_mcp.bench.grade import Answer, grade
    from spd_mcp.investigation.taskdir import create_task
    from spd_mcp.model.session import RunSession

    if agent not in AGENTS:
        raise ValueError(f"unknown agent {agent!r}; built in: {', '.join(AGENTS)}")
    out.mkdir(parents=True, exist_ok=True)
    sessions: dict[str, RunSession] = {}
    records: list[RunRecord] = []
    results = out / "results.jsonl"
    for task in tasks:
        for rep in range(repeats):
            td = create_task(task.run, task.question, root=out / "tasks",
                             launcher={"kind": "bench", "agent": agent, "task": task.id})
            t0 = time.perf_counter()
            calls = asyncio.run(_investigate(task, agent, td.path, threads))
            agent_s = time.perf_counter() - t0
            if task.run not in sessions:
                sessions[task.run] = RunSession.load(task.run)
            g = grade(sessions[task.run], task, Answer.from_task_dir(td.path))
            rec = _record(task, rep, agent, g, calls, agent_s, td.path)
            records.append(rec)
            with open(results, "a") as f:
                f.write(rec.model_dump_json() + "\n")
            log(f"{task.id} #{rep}: {rec.outcome} ({rec.reason[:90]}) "
                f"[{agent_s:.0f} s agent, {g.seconds:.1f} s grading]")
    (out / "summary.json").write_text(json.dumps(
        {"agent": agent, **summarize(records)}, indent=1))
    return records


def report(out: Path) -> str:
    """results.md from ``out``/results.jsonl (also returned)."""
    records = read_results(out)
    s = summarize(records)
    agents = sorted({r.agent for r in records})
    lines = [f"# spd-mcp bench: {', '.join(agents)}", "",
             f"Success {s['successes']}/{s['n_runs']} = {s['success_rate']:.0%} "
             f"(95% CI {s['ci95'][0]:.0%}–{s['ci95'][1]:.0%}); outcomes {s['outcomes']}; "
             f"{s['tool_calls']} tool calls, {s['tool_errors']} errors.", "",
             "| task | agent | outcome | own drop | max other drop | random drop | components "
             "| reason |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        def f(x: float | None) -> str:
            return "" if x is None else f"{x:.2f}"

        lines.append(f"| {r.task_id} | {r.agent} | {r.outcome} | {f(r.own_drop)} | "
                     f"{f(r.max_other_drop)} | {f(r.random_drop)} | {len(r.components)} | "
                     f"{r.reason[:80]} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def add_bench_parser(sub: Any) -> None:
    """``spd-mcp bench run|report|list``."""
    b = sub.add_parser("bench", help="benchmark tasks: run agents, grade by causal re-check")
    bs = b.add_subparsers(dest="bench_command", required=True)
    r = bs.add_parser("run", help="run and grade tasks")
    r.add_argument("--agent", default="scripted", help=f"built in: {', '.join(AGENTS)}")
    r.add_argument("--tasks", default=None, help="comma-separated task ids (default: all)")
    r.add_argument("--repeats", type=int, default=1)
    r.add_argument("--out", type=Path, default=None,
                   help="output directory (default: $SPD_MCP_HOME/bench/<time>)")
    r.add_argument("--threads", type=int, default=1, help="each server's torch threads")
    rep = bs.add_parser("report", help="print results and write results.md")
    rep.add_argument("out", type=Path)
    bs.add_parser("list", help="the task suite")


def bench_command(args: argparse.Namespace) -> int:
    from spd_mcp.bench.tasks import load_tasks

    if args.bench_command == "list":
        for t in load_tasks():
            print(f"{t.id:28s} {t.run:8s} {t.behaviour:10s} budget {t.budget:3d}  {t.question}")
        return 0
    if args.bench_command == "report":
        if not (args.out / "results.jsonl").is_file():
            print(f"spd-mcp: error: no results.jsonl in {args.out}", file=sys.stderr)
            return 2
        print(report(args.out), end="")
        return 0
    tasks = load_tasks()
    if args.tasks:
        want = [t.strip() for t in args.tasks.split(",") if t.strip()]
        known = {t.id: t for t in tasks}
        if missing := [t for t in want if t not in known]:
            print(f"spd-mcp: error: unknown task(s) {', '.join(missing)}; known: "
                  f"{', '.join(known)}", file=sys.stderr)
            return 2
        tasks = [known[t] for t in want]
    if args.agent not in AGENTS:
        print(f"spd-mcp: error: unknown agent {args.agent!r}; built in: {', '.join(AGENTS)} "
              "(claude, sdk and cmd: agents are not built yet)", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print("spd-mcp: error: --repeats must be at least 1", file=sys.stderr)
        return 2
    from spd_mcp.paths import spd_home

    out = args.out or spd_home() / "bench" / time.strftime("%Y%m%d-%H%M%S")
    t0 = time.perf_counter()
    run_bench(tasks, args.agent, out, repeats=args.repeats, threads=args.threads)
    print(report(out), end="")
    print(f"{len(tasks) * args.repeats} runs in {time.perf_counter() - t0:.0f} s; results in "
          f"{out}")
    return 0
