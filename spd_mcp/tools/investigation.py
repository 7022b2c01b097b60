"""Investigation tools: research log, explanations, summary, graph artifacts, suggestions; plus
the ``investigation://`` resources and the ``investigate`` prompt.

All of them write to one task directory (``spd_mcp.investigation.taskdir``): the one given to the
server, or one created under ``$SPD_MCP_HOME/investigations/`` on first use.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.tools.base import Tool
from pydantic import BaseModel, ConfigDict, Field

from spd_mcp.errors import InputError
from spd_mcp.investigation.methodology import methodology_text, model_info_text
from spd_mcp.investigation.taskdir import (
    Event,
    Summary,
    TaskDir,
    TaskInfo,
    create_task,
    investigations_root,
    now_iso,
)
from spd_mcp.keys import BadKeyError
from spd_mcp.service.artifacts import graph_artifact

from .common import READ_ONLY, STORES, GraphIdArg, state, strict_tool

ARTIFACT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,80}$")
SOURCE = "server"


class Investigation:
    """The server's task directory: fixed (``--task-dir``) or created on first use."""

    def __init__(self, task_dir: Path | None = None, root: Path | None = None) -> None:
        self.fixed = task_dir
        self.root = root
        self.run_name = "?"
        self._task: TaskDir | None = None
        self.created_note: str | None = None

    def start(self, run_name: str) -> None:
        """Lifespan start: with a fixed directory, make sure it is a task and log the start."""
        self.run_name = run_name
        if self.fixed is not None:
            td = TaskDir(self.fixed)
            if not td.exists():
                td = create_task(run_name, "(interactive)", path=self.fixed)
            self._task = td
            td.append_event(SOURCE, "server_started", f"server started for run {run_name}",
                            {"run": run_name})

    @property
    def current(self) -> TaskDir | None:
        return self._task

    def task(self) -> TaskDir:
        """The task directory, created under the investigations root on first call."""
        if self._task is None:
            td = create_task(self.run_name, "(interactive)", root=self.root or
                             investigations_root())
            td.append_event(SOURCE, "server_started", f"server started for run {self.run_name}",
                            {"run": self.run_name, "lazy": True})
            self._task = td
            self.created_note = f"created a new investigation task directory at {td.path}"
        return self._task

    def note(self) -> str | None:
        """Where the task was created, once (for the first tool result after lazy creation)."""
        note, self.created_note = self.created_note, None
        return note


# -- argument and result models --------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComponentRole(_Strict):
    key: str = Field(description="'LAYER:C'")
    role: str = Field(min_length=1, max_length=500)


EvidenceType = Literal["intervention", "ablation", "patching", "attention", "graph",
                       "activation_examples", "attribution", "probe", "dataset", "other"]


class Evidence(_Strict):
    type: EvidenceType
    description: str = Field(min_length=1, max_length=4000)
    value: float | None = Field(None, description="the key number, e.g. probability drop")
    artifact_id: str | None = Field(None, description="a saved graph artifact")


class LogResult(BaseModel):
    ok: bool
    path: str
    n_entries: int
    note: str | None = None


class ExplanationResult(BaseModel):
    explanation_id: str
    n_explanations: int
    note: str | None = None


class OkResult(BaseModel):
    ok: bool
    note: str | None = None


class ArtifactResult(BaseModel):
    artifact_id: str
    path: str
    n_nodes: int
    n_edges: int
    reference: str = Field(description="cite this in the research log")
    note: str | None = None


class Counts(BaseModel):
    log_entries: int
    explanations: int
    artifacts: int
    events: int


class InvestigationInfo(BaseModel):
    task: TaskInfo
    question: str
    path: str
    summary: Summary
    counts: Counts
    last_events: list[Event]
    note: str | None = None


def _event(inv: Investigation, type: str, message: str, data: dict[str, Any] | None) -> None:
    inv.task().append_event(SOURCE, type, message, data)


# -- tools -----------------------------------------------------------------------------------------
def tools(inv: Investigation) -> list[Tool]:
    """The investigation tools bound to one task directory holder."""

    async def update_research_log(
        entry: Annotated[str, Field(min_length=1, max_length=20_000,
                                    description="markdown: what you did, saw, concluded")],
        title: Annotated[str | None, Field(max_length=200)] = None,
    ) -> LogResult:
        """Append a timestamped markdown section to the research log; cite graph artifacts as
        [[artifact:ID]]. Example: update_research_log(title="Pronoun circuit",
        entry="optimize_graph kept 7 components; see [[artifact:g3-a1b2c3]]")."""
        if not entry.strip():
            raise InputError("entry is blank; write what you did and what you found")
        td = inv.task()
        n = td.append_log(entry, title)
        td.append_event(SOURCE, "research_log", title or f"entry {n}",
                        {"n_entries": n, "chars": len(entry)})
        return LogResult(ok=True, path=str(td.log_path), n_entries=n, note=inv.note())

    async def save_explanation(
        ctx: Context,
        behaviour: Annotated[str, Field(min_length=1, max_length=2000)],
        components: Annotated[list[ComponentRole], Field(min_length=1, max_length=200)],
        evidence: Annotated[list[Evidence], Field(min_length=1, max_length=100)],
        confidence: Annotated[float, Field(ge=0, le=1)],
        alternatives: Annotated[list[str], Field(max_length=50)] = [],  # noqa: B006
        limitations: Annotated[list[str], Field(max_length=50)] = [],  # noqa: B006
    ) -> ExplanationResult:
        """Record a validated finding: the behaviour, components with their roles, typed evidence
        with values, confidence, alternatives and limitations. Example:
        save_explanation(behaviour="she after a girl's name", components=[{"key":
        "1.attn.o:5", "role": "copies gender"}], evidence=[{"type": "ablation", "description":
        "p(she) 0.9→0.1", "value": -0.8}], confidence=0.8)."""
        st = state(ctx)
        canon = []
        for i, c in enumerate(components):
            try:
                canon.append(str(st.session.keys.component(c.key)))
            except BadKeyError as e:
                raise InputError(f"components[{i}].key: {e}") from None
        td = inv.task()
        known = set(td.artifacts())
        for i, ev in enumerate(evidence):
            if ev.artifact_id is not None and ev.artifact_id not in known:
                raise InputError(f"evidence[{i}].artifact_id {ev.artifact_id!r} is not a saved "
                           f"artifact (saved: {sorted(known) or 'none'}); use "
                           "save_graph_artifact first")
        n = len(td.explanations()) + 1
        eid = f"exp-{n:03d}-{secrets.token_hex(2)}"
        record = {
            "explanation_id": eid, "ts": now_iso(), "behaviour": behaviour,
            "components": [{"key": k, "role": c.role}
                           for k, c in zip(canon, components, strict=True)],
            "evidence": [e.model_dump() for e in evidence], "confidence": confidence,
            "alternatives": alternatives, "limitations": limitations,
        }
        td.append_explanation(record)
        td.append_event(SOURCE, "explanation", behaviour[:200],
                        {"explanation_id": eid, "components": canon, "confidence": confidence})
        return ExplanationResult(explanation_id=eid, n_explanations=n, note=inv.note())

    async def set_investigation_summary(
        title: Annotated[str, Field(min_length=1, max_length=300)],
        summary: Annotated[str, Field(min_length=1, max_length=20_000)],
        status: Literal["in_progress", "completed", "inconclusive"],
    ) -> OkResult:
        """Set the investigation's title, summary and status; call it when you finish."""
        td = inv.task()
        td.set_summary(title, summary, status)
        td.append_event(SOURCE, "summary", f"[{status}] {title}", {"status": status})
        return OkResult(ok=True, note=inv.note())

    async def save_graph_artifact(
        ctx: Context,
        graph_id: GraphIdArg,
        title: Annotated[str, Field(min_length=1, max_length=300)],
        caption: Annotated[str | None, Field(max_length=4000)] = None,
        max_edges: Annotated[int, Field(ge=1, le=5000, description="largest edges kept")] = 300,
        ci_threshold: Annotated[float, Field(ge=0, le=1, description="drop nodes with CI ≤ this")
                                ] = 0.0,
    ) -> ArtifactResult:
        """Save a stored graph as a self-contained JSON artifact (nodes, top edges, prompt,
        optimisation metrics) in the task directory; cite it in the log as [[artifact:ID]]."""
        td = inv.task()
        aid = f"g{graph_id}-{secrets.token_hex(3)}"
        art = await graph_artifact(state(ctx), graph_id, artifact_id=aid, title=title,
                                   caption=caption, max_edges=max_edges,
                                   ci_threshold=ci_threshold)
        path = td.write_artifact(aid, art)
        td.append_event(SOURCE, "artifact", title, {"artifact_id": aid, "graph_id": graph_id,
                                                    "n_edges": len(art["edges"])})
        return ArtifactResult(artifact_id=aid, path=str(path), n_nodes=len(art["nodes"]),
                              n_edges=len(art["edges"]), reference=f"[[artifact:{aid}]]",
                              note=inv.note())

    async def submit_suggestion(
        text: Annotated[str, Field(min_length=1, max_length=4000)],
        category: Annotated[str | None, Field(max_length=100,
                                              description="e.g. missing_tool, bug")] = None,
    ) -> OkResult:
        """Tell the maintainers what tool or feature was missing or awkward."""
        _event(inv, "suggestion", text[:200], {"text": text, "category": category})
        return OkResult(ok=True, note=inv.note())

    async def get_investigation() -> InvestigationInfo:
        """The current investigation: task info, question, summary, counts and the last 10
        events."""
        td = inv.task()
        info = td.info()
        events = td.events()
        counts = Counts(log_entries=td.n_log_entries(), explanations=len(td.explanations()),
                        artifacts=len(td.artifacts()), events=len(events))
        return InvestigationInfo(task=info, question=info.question, path=str(td.path),
                                 summary=td.summary(), counts=counts, last_events=events[-10:],
                                 note=inv.note())

    return [
        strict_tool(update_research_log, STORES, "Append to the research log"),
        strict_tool(save_explanation, STORES, "Save a validated explanation"),
        strict_tool(set_investigation_summary, STORES, "Set the investigation summary"),
        strict_tool(save_graph_artifact, STORES, "Save a graph artifact"),
        strict_tool(submit_suggestion, STORES, "Suggest a tool improvement"),
        strict_tool(get_investigation, READ_ONLY, "Read the investigation state"),
    ]


def register(server: MCPServer[Any], inv: Investigation) -> None:
    """The ``investigation://`` resources and the ``investigate`` prompt."""

    @server.resource("investigation://research_log", name="research_log",
                     description="the investigation's research log", mime_type="text/markdown")
    def research_log() -> str:
        td = inv.current
        return td.log_text() if td is not None else "(no investigation task yet)\n"

    @server.resource("investigation://artifacts/{artifact_id}", name="artifact",
                     description="a saved graph artifact (spd-mcp/graph-artifact v1)",
                     mime_type="application/json")
    def artifact(artifact_id: str) -> str:
        td = inv.current
        if not ARTIFACT_ID.match(artifact_id) or td is None:
            raise ValueError(f"no artifact {artifact_id!r}")
        path = td.artifacts_dir / f"{artifact_id}.json"
        if not path.is_file():
            raise ValueError(f"no artifact {artifact_id!r}; saved: {td.artifacts()}")
        return path.read_text()

    @server.prompt(name="investigate", title="Investigate a question",
                   description="the investigation methodology, with this run's model info")
    def investigate(question: str, ctx: Context) -> str:
        text = methodology_text(model_info_text(state(ctx).session))
        return f"{text}\n\n## Question\n\n{question}\n"
