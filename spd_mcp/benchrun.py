"""``spd-mcp bench``: run benchmark tasks as investigations through the MCP server, grade them.

Each task (× repeat) gets its own task directory and its own server over stdio; the agent answers
with ``save_explanation`` and ``set_investigation_summary``; the causal grader
(:mod:`spd_mcp.bench.grade`) re-checks the answer on held-out probes. Results go to
``results.jsonl`` (one graded run per line, appended as each finishes) and ``summary.json`` in the
output directory; ``bench report`` prints them as a table and writes ``results.md``.

Agents run in-process (``scripted``: the behaviour's example prompt → ``sweep_ablation``'s
greedy necessary set; ``topk``: top-k of ``search_components(output_token)``; ``random``: the
task's budget of random components alive on the example) or as a separate process through the
investigation launcher (:mod:`spd_mcp.launch.local`: ``claude`` for Claude Code, ``sdk`` for the
built-in Messages-API agent, ``cmd:COMMAND`` for any other), each with its own HTTP server, token
and task directory; ``--parallel N`` runs N at once, ``--slurm`` runs every task × repeat as an
element of a SLURM job array and merges the shards in a report job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from spd_mcp.bench.results import AgentUsage, RunRecord, read_results, summarize
from spd_mcp.errors import OperationError
from spd_mcp.files import write_json_atomic, write_text_atomic

if TYPE_CHECKING:  # the CLI imports this module to build its parser: keep that light
    from mcp import ClientSession

    from spd_mcp.bench.grade import GradeResult
    from spd_mcp.bench.tasks import BenchTask

BUILT_IN = ("scripted", "topk", "random")
"""In-process agents (LLM-free baselines)."""
PROCESS_AGENTS = ("claude", "sdk")
"""Agents run through the investigation launcher (plus ``cmd:COMMAND``)."""
TOPK = 8
def answer_format(task: BenchTask) -> str:
    """Appended to every task's question: how the answer is handed in and how it is judged."""
    inputs = "inputs" if task.is_feature else "prompts"
    return (
        "\n\nAnswer through the tools: save one explanation with `save_explanation` whose "
        "`components` list the component keys (LAYER:C) you claim carry this, with their roles "
        "and your evidence, then call `set_investigation_summary` with status `completed` (or "
        f"`inconclusive` if you could not establish an answer). At most {task.budget} "
        f"components. The answer is graded by ablating them on held-out {inputs}: they must be "
        "necessary for this, not for the model's other behaviours, and a random set of the "
        "same size must not do the same.")


def agent_ok(agent: str) -> bool:
    """Whether ``agent`` names a built-in, a launcher agent or a ``cmd:`` command."""
    return agent in BUILT_IN or agent in PROCESS_AGENTS or (
        agent.startswith("cmd:") and bool(agent[4:].strip()))


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


async def _feature_ci(call: _Calls, task: BenchTask) -> list[dict[str, Any]]:
    """The components firing on the task's feature alone (a toy), highest CI first."""
    r = await call("get_ci", {"features": {str(task.feature): 1.0}})
    return sorted(r["positions"][0]["top"], key=lambda t: -t["ci"])


async def _answer(call: _Calls, comps: list[str], role: str, *, behaviour: str,
                  evidence: dict[str, Any], confidence: float, title: str, summary: str,
                  limitations: list[str] | None = None) -> None:
    """Hand in ``comps`` (each with ``role``): one explanation, then a completed summary."""
    explanation: dict[str, Any] = {
        "behaviour": behaviour, "components": [{"key": k, "role": role} for k in comps],
        "evidence": [evidence], "confidence": confidence}
    if limitations:
        explanation["limitations"] = limitations
    await call("save_explanation", explanation)
    await call("set_investigation_summary", {"title": title, "status": "completed",
                                             "summary": summary})


async def toy_agent(call: _Calls, task: BenchTask, how: str, seed: int) -> None:
    """The built-in agents on a feature task: scripted takes each layer's top-CI component on
    the feature's one-hot input, topk the top 8 overall, random ``budget`` of the firing ones."""
    import random

    top = await _feature_ci(call, task)
    if how == "scripted":
        best: dict[str, str] = {}  # layer -> its highest-CI component (top is sorted)
        for t in top:
            best.setdefault(t["key"].rsplit(":", 1)[0], t["key"])
        comps = list(best.values())
    elif how == "topk":
        comps = [t["key"] for t in top[:TOPK]]
    else:
        keys = sorted(t["key"] for t in top)
        comps = random.Random(f"{task.id}/{seed}").sample(keys, min(task.budget, len(keys)))
    await _answer(call, comps, f"fires on feature {task.feature}",
                  behaviour=f"{task.behaviour} ({how})", confidence=0.3,
                  evidence={"type": "probe", "description": f"CI on the one-hot input of "
                                                           f"feature {task.feature}"},
                  title=f"{task.id} ({how})", summary=how)


async def scripted_agent(call: _Calls, task: BenchTask) -> None:
    """The behaviour's example → a greedy necessary set (sweep_ablation) → explanation."""
    prompt, label = await _example(call, task.behaviour)
    r = await call("sweep_ablation", {"text": prompt, "label_token": label, "greedy_steps": 8,
                                      "stop_prob": 0.05, "random_controls": 5, "top": 5})
    comps = r["necessary_set"] or [e["component"] for e in r["ranked"][:1]]
    final = r["greedy"][-1]["ablated"]["prob"] if r["greedy"] else r["target"]["prob"]
    await _answer(
        call, comps, "in the greedy necessary set for the example",
        behaviour=f"{task.behaviour}: predicting '{label}' after the example prompt",
        evidence={"type": "ablation", "value": final,
                  "description": f"ablating the set everywhere takes P({label}) from "
                                 f"{r['target']['prob']:.3f} to {final:.4f}"},
        confidence=0.5,
        limitations=["scripted baseline: one example prompt, no specificity check"],
        title=f"{task.id} (scripted)",
        summary=f"greedy necessary set of {len(comps)} components on one example")


async def topk_agent(call: _Calls, task: BenchTask) -> None:
    """Baseline: the top components by output token (search_components) as the answer."""
    _, label = await _example(call, task.behaviour)
    s = await call("search_components", {"output_token": label, "limit": TOPK})
    comps = [c["key"] for c in s["components"]]
    await _answer(call, comps, f"ranked by search_components('{label}')",
                  behaviour=f"{task.behaviour}: predicting '{label}'", confidence=0.3,
                  evidence={"type": "dataset", "description": "first-order effect ranking"},
                  title=f"{task.id} (top-k)", summary="top-k")


async def random_agent(call: _Calls, task: BenchTask, seed: int) -> None:
    """Baseline: ``budget`` random components among those alive on the example prompt."""
    import random

    prompt, label = await _example(call, task.behaviour)
    r = await call("sweep_ablation", {"text": prompt, "label_token": label, "top": 200})
    alive = sorted(e["component"] for e in r["ranked"])
    comps = random.Random(f"{task.id}/{seed}").sample(alive, min(task.budget, len(alive)))
    await _answer(call, comps, "drawn at random among the alive",
                  behaviour=f"{task.behaviour}: predicting '{label}'", confidence=0.0,
                  evidence={"type": "other", "description": "random baseline"},
                  title=f"{task.id} (random)", summary="random")


async def _investigate(task: BenchTask, agent: str, task_dir: Path, threads: int,
                       repeat: int = 0) -> _Calls:
    from mcp import ClientSession, StdioServerParameters, stdio_client

    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "spd_mcp.cli", "serve", "--run", task.run, "--task-dir", str(task_dir),
              "--threads", str(threads),
              "--job-after", "3600"],  # a scripted client has no timeout: it awaits results
        env=dict(os.environ))
    with open(task_dir / "server.log", "a") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            calls = _Calls(session)
            try:
                if task.is_feature:
                    await toy_agent(calls, task, agent, repeat)
                elif agent == "scripted":
                    await scripted_agent(calls, task)
                elif agent == "topk":
                    await topk_agent(calls, task)
                else:
                    await random_agent(calls, task, repeat)
            except BenchError as e:  # the run is graded as it stands (likely invalid)
                (task_dir / "agent_error.txt").write_text(str(e))
            return calls


def _record(task: BenchTask, repeat: int, agent: str, g: GradeResult, task_dir: Path | None,
            agent_s: float, usage: AgentUsage) -> RunRecord:
    sc = g.scores
    return RunRecord(
        task_id=task.id, repeat=repeat, agent=agent, outcome=g.outcome, success=g.success,
        reason=g.reason, components=g.components,
        own_drop=round(sc.own.drop, 4) if sc else None,
        max_other_drop=round(max((o.drop for o in sc.others), default=0.0), 4) if sc else None,
        random_drop=round(sc.random.mean_drop, 4) if sc else None,
        **usage.model_dump(), agent_seconds=round(agent_s, 2), grade_seconds=g.seconds,
        task_dir="" if task_dir is None else str(task_dir))


def stream_usage(path: Path, server: str = "spd") -> AgentUsage:
    """Usage from a Claude-Code-style stream-json transcript (``agent_output.jsonl``): the
    server's tool calls and errors, and the final ``result`` line's turns, tokens and cost."""
    prefix = f"mcp__{server}__"
    ours: set[str] = set()
    u = AgentUsage()
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return u
    transcript = False
    for line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict):
            continue
        content = (obj.get("message") or {}).get("content")
        if obj.get("type") == "assistant" and isinstance(content, list):
            transcript = True
            for b in content:
                if isinstance(b, dict) and b.get("type") == "tool_use" and \
                        str(b.get("name", "")).startswith(prefix):
                    ours.add(b.get("id", ""))
                    u.tool_calls += 1
        elif obj.get("type") == "user" and isinstance(content, list):
            u.tool_errors += sum(1 for b in content if isinstance(b, dict)
                                 and b.get("type") == "tool_result" and b.get("is_error")
                                 and b.get("tool_use_id") in ours)
        elif obj.get("type") == "result":
            usage = obj.get("usage") or {}
            u.turns = obj.get("num_turns")
            if usage:
                u.input_tokens = sum(int(usage.get(k) or 0) for k in (
                    "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
                u.output_tokens = int(usage.get("output_tokens") or 0)
            cost = obj.get("total_cost_usd")
            u.cost_usd = float(cost) if cost is not None else None
            u.agent_exit = obj.get("subtype")
    if not transcript:  # e.g. a cmd: agent printing only its result: calls unknown
        u.tool_calls = u.tool_errors = None
    return u


class BenchOptions(BaseModel):
    """How to run a suite."""

    model_config = ConfigDict(extra="forbid")

    agent: str = "scripted"
    repeats: int = Field(1, ge=1)
    parallel: int = Field(1, ge=1, le=64)
    threads: int = Field(1, ge=1, description="each server's torch threads")
    model: str = "opus"
    max_turns: int = Field(40, ge=1)
    budget_usd: float | None = Field(None, gt=0, description="spending cap per agent run")
    agent_timeout_s: float | None = Field(1800.0, gt=0)
    claude: str | None = None


class _Grader:
    """Grades answers (one loaded session per run, loaded on first use) and appends records."""

    def __init__(self, out: Path, log: Any) -> None:
        self.out, self.log = out, log
        self.sessions: dict[str, Any] = {}
        self.records: list[RunRecord] = []
        self.lock = threading.Lock()

    def invalid(self, task: BenchTask, rep: int, agent: str, reason: str) -> RunRecord:
        """Record a run that could not start as ``invalid``."""
        from spd_mcp.bench.grade import GradeResult

        g = GradeResult(task_id=task.id, outcome="invalid", success=False, reason=reason,
                        distributed=task.distributed)
        return self._add(_record(task, rep, agent, g, None, 0.0,
                                 AgentUsage(tool_calls=None, tool_errors=None)), g)

    def _add(self, rec: RunRecord, g: GradeResult) -> RunRecord:
        self.records.append(rec)
        with open(self.out / "results.jsonl", "a") as f:
            f.write(rec.model_dump_json() + "\n")
        cost = "" if rec.cost_usd is None else f", ${rec.cost_usd:.3f}"
        self.log(f"{rec.task_id} #{rec.repeat}: {rec.outcome} ({rec.reason[:90]}) "
                 f"[{rec.agent_seconds:.0f} s agent{cost}, {g.seconds:.1f} s grading]")
        return rec

    def __call__(self, task: BenchTask, rep: int, agent: str, task_dir: Path, agent_s: float,
                 usage: AgentUsage) -> RunRecord:
        from spd_mcp.bench.grade import Answer, grade
        from spd_mcp.model.session import RunSession

        with self.lock:
            try:
                if task.run not in self.sessions:
                    self.sessions[task.run] = RunSession.load(task.run)
                g = grade(self.sessions[task.run], task, Answer.from_task_dir(task_dir))
            except Exception as e:  # a run that does not load: this task is invalid, go on
                from spd_mcp.bench.grade import GradeResult

                g = GradeResult(task_id=task.id, outcome="invalid", success=False,
                                reason=f"cannot grade: {e}", distributed=task.distributed)
            return self._add(_record(task, rep, agent, g, task_dir, agent_s, usage), g)


def _missing_runs(runs: set[str]) -> dict[str, str]:
    """Runs that do not resolve, with the reason."""
    from spd_mcp.errors import SpdMcpError
    from spd_mcp.model.run_io import resolve_run

    missing = {}
    for run in sorted(runs):
        try:
            resolve_run(run)
        except SpdMcpError as e:
            missing[run] = str(e)
    return missing


def run_bench(tasks: list[BenchTask], agent: str, out: Path, *, repeats: int = 1,
              threads: int = 1, log: Any = print, options: BenchOptions | None = None,
              jobs: list[tuple[BenchTask, int]] | None = None) -> list[RunRecord]:
    """Run, grade and record every task × repeat (or the given ``jobs``); results.jsonl and
    summary.json in ``out``."""
    opts = options or BenchOptions(agent=agent, repeats=repeats, threads=threads)
    if not agent_ok(opts.agent):
        raise ValueError(f"unknown agent {opts.agent!r}; built in: {', '.join(BUILT_IN)}; "
                         f"launched: {', '.join(PROCESS_AGENTS)}, cmd:COMMAND")
    if (out / "results.jsonl").exists():
        raise BenchError(f"{out} already holds results (results.jsonl): choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    todo = jobs if jobs is not None else [(t, r) for t in tasks for r in range(opts.repeats)]
    grader = _Grader(out, log)
    missing = _missing_runs({t.run for t, _ in todo})
    for task, rep in todo:  # nothing to investigate: invalid without starting an agent
        if task.run in missing:
            grader.invalid(task, rep, opts.agent, f"task names run {task.run!r}, which cannot be "
                           f"loaded: {missing[task.run]}")
    runnable = [(t, r) for t, r in todo if t.run not in missing]
    if runnable and opts.agent in BUILT_IN:
        asyncio.run(_run_built_in(runnable, opts, out, grader))
    elif runnable:
        _run_launched(runnable, opts, out, grader)
    order = {(t.id, r): i for i, (t, r) in enumerate(todo)}
    records = sorted(grader.records, key=lambda r: order.get((r.task_id, r.repeat), 0))
    # appended as runs finished; rewritten in plan order (atomically) now all are in
    write_text_atomic(out / "results.jsonl",
                      "".join(r.model_dump_json() + "\n" for r in records))
    write_json_atomic(out / "summary.json", {"agent": opts.agent, **summarize(records)},
                      indent=1)
    return records


async def _run_built_in(todo: list[tuple[BenchTask, int]], opts: BenchOptions, out: Path,
                        grader: _Grader) -> None:
    from spd_mcp.investigation.taskdir import create_task

    gate = asyncio.Semaphore(opts.parallel)

    async def one(task: BenchTask, rep: int) -> None:
        async with gate:
            td = create_task(task.run, task.question + answer_format(task), root=out / "tasks",
                             launcher={"kind": "bench", "agent": opts.agent, "task": task.id,
                                       "repeat": rep})
            t0 = time.perf_counter()
            try:
                calls = await asyncio.wait_for(
                    _investigate(task, opts.agent, td.path, opts.threads, rep),
                    opts.agent_timeout_s)
                usage = AgentUsage(tool_calls=calls.n, tool_errors=calls.errors)
            except Exception as e:  # the server did not start, the agent timed out, ...
                (td.path / "agent_error.txt").write_text(f"{type(e).__name__}: {e}")
                usage = AgentUsage(tool_calls=None, tool_errors=None,
                                   agent_exit=f"{type(e).__name__}: {str(e)[:200]}")
            await asyncio.to_thread(grader, task, rep, opts.agent, td.path,
                                    time.perf_counter() - t0, usage)

    await asyncio.gather(*(one(t, r) for t, r in todo))


def _run_launched(todo: list[tuple[BenchTask, int]], opts: BenchOptions, out: Path,
                  grader: _Grader) -> None:
    from spd_mcp.launch.local import Investigation, LaunchOptions, drive, find_claude

    claude = find_claude(opts.claude) if opts.agent == "claude" else None
    runs: list[Investigation] = []
    meta: dict[int, tuple[BenchTask, int]] = {}
    for task, rep in todo:
        lo = LaunchOptions(run=task.run, question=task.question + answer_format(task),
                           agent=opts.agent, max_turns=opts.max_turns, model=opts.model,
                           budget_usd=opts.budget_usd, root=out / "tasks", claude=opts.claude,
                           server_threads=opts.threads, agent_timeout_s=opts.agent_timeout_s,
                           facts={"bench": {"task": task.id, "repeat": rep}})
        inv = Investigation(lo, claude, index=rep)
        meta[id(inv)] = (task, rep)
        runs.append(inv)
    def done(inv: Investigation) -> None:
        task, rep = meta[id(inv)]
        usage = stream_usage(inv.path / "agent_output.jsonl")
        if inv.error:
            usage.agent_exit = f"launcher error: {inv.error.splitlines()[0][:200]}"
        elif usage.agent_exit is None:
            usage.agent_exit = f"exit {inv.exit_code}"
        grader(task, rep, opts.agent, inv.path, time.monotonic() - inv.created_at, usage)

    interrupted = drive(runs, parallel=opts.parallel, echo=False, on_done=done)
    if interrupted is not None:
        raise KeyboardInterrupt(f"bench interrupted by {interrupted}")


def report(out: Path) -> str:
    """results.md (and summary.json) from ``out``'s results, shards included (also returned)."""
    records = read_results(out)
    s = summarize(records)
    agents = sorted({r.agent for r in records})
    write_json_atomic(out / "summary.json", {"agent": ",".join(agents), **s}, indent=1)

    def f(x: float | None, fmt: str = ".2f") -> str:
        return "" if x is None else format(x, fmt)

    spent = "" if s["cost_usd"] is None else f", ${s['cost_usd']:.2f}"
    tokens = "" if s["input_tokens"] is None else \
        f", {s['input_tokens']} input / {s['output_tokens']} output tokens"
    lines = [f"# spd-mcp bench: {', '.join(agents)}", "",
             f"Success {s['successes']}/{s['n_runs']} = {s['success_rate']:.0%} "
             f"(95% CI {s['ci95'][0]:.0%}–{s['ci95'][1]:.0%}); outcomes {s['outcomes']}; "
             f"{s['tool_calls'] or 0} tool calls, {s['tool_errors'] or 0} errors{tokens}{spent}; "
             f"{s['agent_seconds']:.0f} s agents, {s['grade_seconds']:.0f} s grading.", "",
             "| task | # | agent | outcome | own drop | max other drop | random drop | components "
             "| tool calls | cost | seconds | reason |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r.task_id} | {r.repeat} | {r.agent} | {r.outcome} | {f(r.own_drop)} | "
                     f"{f(r.max_other_drop)} | {f(r.random_drop)} | {len(r.components)} | "
                     f"{'' if r.tool_calls is None else r.tool_calls} | "
                     f"{f(r.cost_usd, '.3f')} | {r.agent_seconds:.0f} | "
                     f"{r.reason[:80].replace('|', '/')} |")
    text = "\n".join(lines) + "\n"
    write_text_atomic(out / "results.md", text)
    return text


def print_table(out: Path) -> None:
    """The results as a rich table on the terminal (``report`` writes the markdown)."""
    from rich.console import Console
    from rich.table import Table

    records = read_results(out)
    s = summarize(records)
    colour = {"success": "green", "wrong": "red", "inconclusive": "yellow", "invalid": "magenta"}
    table = Table(title=f"spd-mcp bench: {out}", caption=(
        f"success {s['successes']}/{s['n_runs']} = {s['success_rate']:.0%} (95% CI "
        f"{s['ci95'][0]:.0%}–{s['ci95'][1]:.0%}); {s['outcomes']}"))
    for col, just in (("task", "left"), ("#", "right"), ("agent", "left"), ("outcome", "left"),
                      ("own", "right"), ("other", "right"), ("random", "right"),
                      ("comps", "right"), ("calls", "right"), ("cost", "right"),
                      ("s", "right"), ("reason", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]

    def f(x: float | None, fmt: str = ".2f") -> str:
        return "" if x is None else format(x, fmt)

    for r in records:
        table.add_row(r.task_id, str(r.repeat), r.agent[:24],
                      f"[{colour.get(r.outcome, 'white')}]{r.outcome}[/]", f(r.own_drop),
                      f(r.max_other_drop), f(r.random_drop), str(len(r.components)),
                      "" if r.tool_calls is None else str(r.tool_calls), f(r.cost_usd, ".3f"),
                      f"{r.agent_seconds:.0f}", r.reason[:60])
    console = Console()
    (console if console.is_terminal else Console(width=200)).print(table)


def add_bench_parser(sub: Any) -> None:
    """``spd-mcp bench run|report|list``."""
    b = sub.add_parser("bench", help="benchmark tasks: run agents, grade by causal re-check")
    bs = b.add_subparsers(dest="bench_command", required=True)
    r = bs.add_parser("run", help="run and grade tasks")
    r.add_argument("suite", nargs="?", default=None,
                   help="a shipped suite (spd-mcp bench list shows them; default: all)")
    r.add_argument("--agent", default="scripted",
                   help=f"built in: {', '.join(BUILT_IN)}; launched: claude (Claude Code), sdk "
                        "(the Messages-API agent: ANTHROPIC_BASE_URL / ANTHROPIC_API_KEY), "
                        "cmd:'COMMAND' (any agent; see docs/bench.md)")
    r.add_argument("--tasks", default=None, help="comma-separated task ids (default: all)")
    r.add_argument("--task-dir", type=Path, default=None,
                   help="read tasks from this directory of *.yaml (default: the shipped suite)")
    r.add_argument("--repeats", type=int, default=1)
    r.add_argument("--parallel", type=int, default=1, help="runs at once (default 1)")
    r.add_argument("--out", type=Path, default=None,
                   help="output directory (default: $SPD_MCP_HOME/bench/<time>)")
    r.add_argument("--threads", type=int, default=1, help="each server's torch threads")
    r.add_argument("--model", default="opus", help="claude / sdk: the model (default opus)")
    r.add_argument("--max-turns", type=int, default=40, help="claude / sdk: turn cap (40)")
    r.add_argument("--budget-usd", type=float, default=None,
                   help="spending cap per agent run (claude / sdk stop there)")
    r.add_argument("--agent-timeout", type=float, default=1800.0,
                   help="seconds before a launched agent is stopped (default 1800)")
    r.add_argument("--claude", default=None, help="claude executable (default: PATH)")
    r.add_argument("--slurm", action="store_true",
                   help="run every task x repeat as a SLURM array element, then a report job")
    g = r.add_argument_group("SLURM (with --slurm)")
    g.add_argument("--partition")
    g.add_argument("--time")
    g.add_argument("--gpus", type=int)
    g.add_argument("--mem")
    r.add_argument("--shard", type=int, default=None, help=argparse.SUPPRESS)
    rep = bs.add_parser("report", help="print results and write results.md")
    rep.add_argument("out", type=Path)
    ls = bs.add_parser("list", help="the shipped suites and their tasks")
    ls.add_argument("suite", nargs="?", default=None)
    ls.add_argument("--task-dir", type=Path, default=None)


def _err(msg: str) -> int:
    print(f"spd-mcp: error: {msg}", file=sys.stderr)
    return 2


def bench_command(args: argparse.Namespace) -> int:
    from spd_mcp.bench.tasks import TaskError, load_tasks, suites

    if args.bench_command == "report":
        if not read_results(args.out):
            return _err(f"no results.jsonl in {args.out}")
        report(args.out)
        print_table(args.out)
        print(f"wrote {args.out / 'results.md'} and {args.out / 'summary.json'}")
        return 0
    if args.suite is not None and args.task_dir is not None:
        return _err("give a suite or --task-dir, not both")
    try:
        tasks = load_tasks(args.task_dir, suite=args.suite)
    except TaskError as e:
        return _err(str(e))
    if args.bench_command == "list":
        if args.task_dir is None and args.suite is None:
            print(f"suites: {', '.join(suites())}")
        for t in tasks:
            q = " ".join(t.question.split())
            print(f"{t.id:34s} {t.run:12s} {t.behaviour:10s} budget {t.budget:3d}  {q[:70]}")
        return 0
    if args.tasks:
        want = [t.strip() for t in args.tasks.split(",") if t.strip()]
        known = {t.id: t for t in tasks}
        if missing := [t for t in want if t not in known]:
            return _err(f"unknown task(s) {', '.join(missing)}; known: {', '.join(known)}")
        tasks = [known[t] for t in want]
    if not agent_ok(args.agent):
        return _err(f"unknown agent {args.agent!r}; built in: {', '.join(BUILT_IN)}; launched: "
                    f"{', '.join(PROCESS_AGENTS)}, cmd:'COMMAND'")
    from pydantic import ValidationError

    try:
        opts = BenchOptions(agent=args.agent, repeats=args.repeats, parallel=args.parallel,
                            threads=args.threads, model=args.model, max_turns=args.max_turns,
                            budget_usd=args.budget_usd, agent_timeout_s=args.agent_timeout,
                            claude=args.claude)
    except ValidationError as e:
        bad = "; ".join(f"--{'-'.join(map(str, x['loc'])).replace('_', '-')}: {x['msg']}"
                        for x in e.errors())
        return _err(bad)
    from spd_mcp.paths import spd_home

    out = args.out or spd_home() / "bench" / time.strftime("%Y%m%d-%H%M%S")
    jobs = [(t, r) for t in tasks for r in range(opts.repeats)]
    if args.shard is not None:  # one element of a SLURM array: its job from the plan
        if not 0 <= args.shard < len(jobs):
            return _err(f"--shard {args.shard} outside 0..{len(jobs) - 1}")
        run_bench(tasks, opts.agent, out / f"shard-{args.shard:04d}", options=opts,
                  jobs=[jobs[args.shard]])
        return 0
    if args.slurm:
        from spd_mcp.launch.slurm import SlurmError, SlurmOptions, submit_bench

        try:
            array, rep = submit_bench(
                _shard_argv(args, out), len(jobs), out,
                SlurmOptions(partition=args.partition, time=args.time, gpus=args.gpus,
                             mem=args.mem))
        except SlurmError as e:
            return _err(str(e))
        print(f"{array} {rep}")
        print(f"submitted {len(jobs)} run(s) as array {array}, report {rep}; results in {out} "
              f"(spd-mcp bench report {out})", file=sys.stderr)
        return 0
    t0 = time.perf_counter()
    try:
        run_bench(tasks, opts.agent, out, options=opts, jobs=jobs)
    except OperationError as e:  # e.g. the claude executable is missing
        return _err(str(e))
    report(out)
    print_table(out)
    print(f"{len(jobs)} runs in {time.perf_counter() - t0:.0f} s; results in {out}")
    return 0


def _shard_argv(args: argparse.Namespace, out: Path) -> list[str]:
    """The ``spd-mcp bench run`` command of one array element (``--shard`` added by SLURM)."""
    argv = ["bench", "run", *([args.suite] if args.suite else []), "--agent", args.agent,
            "--repeats", str(args.repeats),
            "--out", str(out.resolve()), "--threads", str(args.threads), "--model", args.model,
            "--max-turns", str(args.max_turns), "--agent-timeout", f"{args.agent_timeout:g}"]
    for flag, value in (("--tasks", args.tasks), ("--budget-usd", args.budget_usd),
                        ("--claude", args.claude), ("--task-dir", args.task_dir)):
        if value is not None:
            argv += [flag, str(Path(value).resolve()) if flag == "--task-dir" else str(value)]
    return argv
