"""The viewer's Starlette app: JSON API over the same analysis functions, stores and compute
executor as the MCP tools, plus the static single-page front end (no external assets).

Every handler goes through the service layer (``spd_mcp.service``: ``natural_graph``,
``optimized_graph``, ``intervention``, ``component_info``, ``model_info``, ``graph_artifact``), so
the viewer has no computation of its own and nothing of the MCP face; benchmark results are read
with ``spd_mcp.bench.results``. Bad input (any :class:`~spd_mcp.errors.InputError`) answers 400
``{"error": ...}``, an unknown benchmark 404, an overloaded compute queue 503.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from spd_mcp.analysis.optimize import OptimizeSettings
from spd_mcp.bench.results import RunRecord, read_results, summarize
from spd_mcp.errors import InputError
from spd_mcp.investigation.taskdir import TaskDir, list_tasks
from spd_mcp.keys import is_special_layer
from spd_mcp.model.session import RunSession
from spd_mcp.paths import investigations_root, spd_home
from spd_mcp.service.executor import Busy, ComputeExecutor
from spd_mcp.service.state import AppState, open_state
from spd_mcp.service.worker import WorkerProcess
from spd_mcp.viewer.jobs import Job, Jobs
from spd_mcp.viewer.markdown import render_markdown

STATIC = Path(str(resources.files("spd_mcp") / "viewer" / "static"))
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,120}$")
MAX_VIEW_EDGES = 20_000
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")


class BadRequest(InputError):
    """A request the viewer refuses; the message is shown to the user."""


class NotFound(BadRequest):
    """A well-formed request for something that is not there (answers 404)."""


def describe_error(exc: BaseException) -> str | None:
    """A readable message for an expected failure (None for a bug)."""
    if isinstance(exc, (InputError, Busy)):
        return str(exc)
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                         for e in exc.errors())
    return None


# -- request bodies ----------------------------------------------------------------------------
class GraphRequest(BaseModel):
    text: str
    mode: Literal["natural", "optimized"] = "natural"
    label_token: str | None = Field(None, description="token to explain (optimized: required)")
    position: int = -1
    ci_threshold: float = Field(0.0, ge=0, le=1, description="natural graphs: node CI > this")
    steps: int = Field(200, ge=1, le=2000, description="optimisation steps")
    imp_coeff: float = Field(0.003, ge=0)


class InterventionRequest(BaseModel):
    text: str
    nodes: list[str] = Field(min_length=1, max_length=4096)
    label_token: str | None = None
    label_position: int | None = None
    top_k: int = Field(5, ge=1, le=20)
    pgd_steps: int = Field(20, ge=1, le=200)
    pgd_step_size: float = Field(0.1, gt=0, le=1)
    n_samples: int = Field(8, ge=1, le=64)
    ablate_rest_of: int | None = Field(
        None, description="graph id: the ablated regime ablates that graph's other component "
        "nodes instead of the selected ones")


class LaunchRequest(BaseModel):
    run: str = Field(min_length=1, max_length=500)
    question: str = Field(min_length=1, max_length=20_000)


# -- state -------------------------------------------------------------------------------------
@dataclass
class Viewer:
    """Loaded runs (each with its own app database), one shared compute executor, the jobs."""

    default_run: str
    device: str = "cpu"
    sessions: dict[str, RunSession] = field(default_factory=dict)
    executor: ComputeExecutor = field(default_factory=ComputeExecutor)
    states: dict[str, AppState] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    jobs: Jobs = field(default_factory=lambda: Jobs(describe_error))
    launch_mode: Literal["claude", "scripted"] | None = None
    launch_argv: list[str] | None = None
    bench_dirs: dict[str, Path] = field(default_factory=dict)  # extra results dirs, by name

    async def state(self, run: str) -> AppState:
        """The AppState of ``run`` (loaded on first use; the same DB path as ``spd-mcp serve``)."""
        async with self.lock:
            st = self.states.get(run)
            if st is None:
                session = self.sessions.get(run)
                if session is None:
                    try:
                        session = await asyncio.to_thread(RunSession.load, run,
                                                          device=self.device)
                    except (OSError, ValueError, KeyError) as err:
                        raise BadRequest(f"cannot load run {run!r}: {err}") from None
                st = await open_state(session, self.executor, auto_prepare=False)
                self.states[run] = st
            return st

    async def close(self) -> None:
        await self.jobs.cancel_all()
        for st in self.states.values():
            await st.store.close()
        self.executor.shutdown()


def _viewer(request: Request) -> Viewer:
    return request.app.state.viewer  # type: ignore[no-any-return]


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


Handler = Callable[[Request], Awaitable[Any]]


def api(fn: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a handler: a returned model/dict becomes JSON, expected errors become 400 / 503."""

    async def endpoint(request: Request) -> Response:
        try:
            out = await fn(request)
        except Busy as exc:
            return _error(str(exc), 503)
        except NotFound as exc:
            return _error(str(exc), 404)
        except Exception as exc:
            msg = describe_error(exc)
            if msg is None:
                raise
            return _error(msg)
        if isinstance(out, Response):
            return out
        if isinstance(out, BaseModel):
            out = out.model_dump(mode="json")
        return JSONResponse(out)

    return endpoint


async def _body(request: Request, model: type[BaseModel]) -> Any:
    try:
        raw = await request.body()
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        raise BadRequest(describe_error(exc) or "bad request body") from None


def _run_name(request: Request) -> str:
    return str(request.path_params["run"])


# -- runs --------------------------------------------------------------------------------------
def _run_rows() -> list[dict[str, Any]]:
    from spd_mcp.attributions.store import load_attributions
    from spd_mcp.harvest.store import find_harvest
    from spd_mcp.interp.store import labels_path
    from spd_mcp.model.run_io import list_runs, read_meta

    rows = []
    for name, path in list_runs():
        try:
            meta = read_meta(path)
        except Exception as err:  # a broken run is listed, not fatal
            rows.append({"name": name, "path": str(path), "error": str(err)})
            continue
        run_id = str(meta.get("run_id", meta.get("name", name)))
        layers = [{"module": m, "C": int(v["C"])} for m, v in meta.get("layers", {}).items()]
        target = meta.get("target", {})
        rows.append({
            "name": name, "path": str(path), "run_id": run_id,
            "created": meta.get("created_at"),
            "target": target.get("zoo") or target.get("factory") or "?",
            "layers": layers, "n_components": sum(x["C"] for x in layers),
            "analyses": {
                "harvest": find_harvest(path) is not None,
                "attributions": load_attributions(path, missing_ok=True) is not None,
                "labels": labels_path(run_id).exists(),
            },
        })
    return rows


async def runs(request: Request) -> Any:
    rows = await asyncio.to_thread(_run_rows)
    return {"default_run": _viewer(request).default_run, "runs": rows}


async def run_info(request: Request) -> Any:
    from spd_mcp.service.model_info import model_info

    st = await _viewer(request).state(_run_name(request))
    return await model_info(st)


# -- graphs ------------------------------------------------------------------------------------
async def start_graph(request: Request) -> Any:
    from spd_mcp.service.graphs import natural_graph, optimized_graph

    v = _viewer(request)
    body: GraphRequest = await _body(request, GraphRequest)
    st = await v.state(_run_name(request))
    ids = st.session.encode(body.text)  # fail fast on unknown words
    if body.mode == "optimized" and not body.label_token:
        raise BadRequest("an optimised graph needs a target token (the prediction to explain)")
    if body.label_token:
        st.session.token_id(body.label_token)

    async def work(job: Job) -> dict[str, Any]:
        if body.mode == "natural":
            g = await natural_graph(st, text=body.text, prompt_id=None,
                                    ci_threshold=body.ci_threshold,
                                    output_position=body.position,
                                    label_token=body.label_token, progress=job.progress)
            return {"graph_id": g.graph_id, "cached": g.cached, "n_nodes": g.n_nodes,
                    "n_edges": g.n_edges}
        settings = OptimizeSettings(steps=body.steps, imp_coeff=body.imp_coeff)
        o = await optimized_graph(st, text=body.text, prompt_id=None,
                                  label_token=body.label_token, position=body.position,
                                  settings=settings, progress=job.progress)
        return {"graph_id": o.graph_id, "cached": o.cached, "n_nodes": o.n_nodes,
                "n_edges": o.n_edges, "metrics": o.metrics.model_dump(mode="json")}

    what = "optimising a sparse circuit" if body.mode == "optimized" else "attribution graph"
    job = v.jobs.start("graph", f"{what} ({len(ids)} tokens)", work)
    return job.view()


def _float_param(request: Request, name: str, default: float, lo: float, hi: float) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        x = float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number, got {raw!r}") from None
    if not lo <= x <= hi:
        raise BadRequest(f"{name} must be in [{lo}, {hi}], got {x}")
    return x


async def get_graph(request: Request) -> Any:
    """A stored graph as a graph artifact (the format investigations save), filtered by CI."""
    from spd_mcp.service.artifacts import graph_artifact

    st = await _viewer(request).state(_run_name(request))
    try:
        gid = int(request.path_params["graph_id"])
    except ValueError:
        raise BadRequest("graph id must be an integer") from None
    thr = _float_param(request, "ci_threshold", 0.0, 0.0, 1.0)
    max_edges = int(_float_param(request, "max_edges", 2000, 1, MAX_VIEW_EDGES))
    art = await graph_artifact(st, gid, artifact_id=f"view-{gid}", title=f"graph {gid}",
                               max_edges=max_edges, ci_threshold=thr)
    art["layers"] = ["embed", *st.session.layers, "output"]
    return art


async def component(request: Request) -> Any:
    """The node card: label, top tokens and activation examples (when the run has a harvest)."""
    from spd_mcp.harvest import query as K
    from spd_mcp.service.knowledge import component_info

    st = await _viewer(request).state(_run_name(request))
    key = str(st.session.keys.component(str(request.path_params["key"])))
    h = await st.harvest()
    if h is None:
        name = st.session.run.name
        return {"key": key, "info": None, "examples": None,
                "notice": f"no harvest yet — run `spd-mcp prepare {name}` to see this "
                          "component's label, top tokens and activation examples"}
    info = await component_info(st, h, key, top_k=8)
    examples = await asyncio.to_thread(K.activation_examples, st.session, h, key, limit=5,
                                       order="ci")
    return {"key": key, "info": info.model_dump(mode="json"),
            "examples": examples.model_dump(mode="json"), "notice": None}


# -- interventions -----------------------------------------------------------------------------
async def start_intervention(request: Request) -> Any:
    from spd_mcp.service.graphs import stored_graph
    from spd_mcp.service.interventions import intervention

    v = _viewer(request)
    body: InterventionRequest = await _body(request, InterventionRequest)
    st = await v.state(_run_name(request))
    s = st.session
    ids = s.encode(body.text)
    T = len(ids)
    selected = [str(s.keys.node(k, T, allow_special=False)) for k in body.nodes]
    rest: list[str] | None = None
    if body.ablate_rest_of is not None:
        g = await stored_graph(st, body.ablate_rest_of)
        if list(g.tokens) != ids:
            raise BadRequest(f"graph {body.ablate_rest_of} is for another prompt")
        chosen = set(selected)
        rest = [k for k, lay in zip(g.node_keys, g.node_layer, strict=True)
                if not is_special_layer(lay) and k not in chosen]
    loss: Literal["kl", "label"] = "label" if body.label_token else "kl"
    common: dict[str, Any] = dict(
        text=body.text, prompt_id=None, loss=loss, label_token=body.label_token,
        label_position=body.label_position, positions=list(range(T)), top_k=body.top_k,
        n_samples=body.n_samples, pgd_steps=body.pgd_steps, pgd_step_size=body.pgd_step_size)

    async def work(job: Job) -> dict[str, Any]:
        if rest is None:
            res = await intervention(st, nodes=selected, progress=job.progress, **common)
            return {"result": res.model_dump(mode="json"), "ablated_nodes": selected}
        main = await intervention(st, nodes=selected, regimes=("ci", "stochastic", "adversarial"),
                                  progress=job.progress, **common)
        # Nothing else in the graph: ablating no node leaves the target model itself.
        abl = await intervention(st, nodes=rest, regimes=("ablated",), **common)
        merged = main.model_dump(mode="json")
        a = abl.model_dump(mode="json")
        merged["loss"]["ablated"] = a["loss"]["ablated"]
        if merged.get("label_prob") is not None and a.get("label_prob") is not None:
            merged["label_prob"]["ablated"] = a["label_prob"]["ablated"]
        for row, arow in zip(merged["predictions"], a["predictions"], strict=True):
            row["regimes"]["ablated"] = arow["regimes"]["ablated"]
            if row.get("label") is not None and arow.get("label") is not None:
                row["label"]["ablated"] = arow["label"]["ablated"]
        return {"result": merged, "ablated_nodes": rest}

    job = v.jobs.start("intervention", f"{len(selected)} nodes under four regimes", work)
    return job.view()


async def job_status(request: Request) -> Any:
    job = _viewer(request).jobs.get(str(request.path_params["job_id"]))
    if job is None:
        return _error("no such job (the viewer may have restarted)", 404)
    return job.view()


# -- investigations ----------------------------------------------------------------------------
def _age(ts: str | None) -> float | None:
    if not ts:
        return None
    try:
        t = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    return round(time.time() - t.astimezone(UTC).timestamp(), 1)


def _task(task_id: str) -> TaskDir:
    if not SAFE_ID.match(task_id):
        raise BadRequest(f"bad investigation id {task_id!r}")
    td = TaskDir(investigations_root() / task_id)
    if not td.exists():
        raise BadRequest(f"no investigation {task_id!r} under {investigations_root()}")
    return td


def _list_investigations(run: str | None) -> list[dict[str, Any]]:
    out = []
    for info in list_tasks():
        if run and info.run != run and Path(info.run).name != run:
            continue
        td = TaskDir(Path(info.path))
        s = td.summary()
        events = td.events()
        last = events[-1] if events else None
        out.append({
            "id": info.id, "dir": Path(info.path).name, "run": info.run,
            "question": info.question, "title": s.title, "status": s.status,
            "created": info.created, "updated": s.updated,
            "last_event": last.model_dump() if last else None,
            "age_s": _age(last.ts if last else info.created),
        })
    return out


async def investigations(request: Request) -> Any:
    run = request.query_params.get("run") or None
    return {"root": str(investigations_root()),
            "investigations": await asyncio.to_thread(_list_investigations, run)}


def _detail(td: TaskDir) -> dict[str, Any]:
    info = td.info()
    log = td.log_text()
    return {
        "id": info.id, "dir": td.path.name, "info": info.model_dump(),
        "summary": td.summary().model_dump(),
        "summary_html": render_markdown(td.summary().summary),
        "log_html": render_markdown(log), "log_chars": len(log),
        "explanations": td.explanations(),
        "events": [e.model_dump() for e in td.events()],
        "artifacts": td.artifacts(),
    }


async def investigation(request: Request) -> Any:
    td = _task(str(request.path_params["task_id"]))
    return await asyncio.to_thread(_detail, td)


async def _artifact(td: TaskDir, aid: str) -> Any:
    if not SAFE_ID.match(aid) or aid not in td.artifacts():
        raise BadRequest(f"no artifact {aid!r} in investigation {td.path.name}")
    return await asyncio.to_thread(td.artifact, aid)


async def artifact(request: Request) -> Any:
    td = _task(str(request.path_params["task_id"]))
    return await _artifact(td, str(request.path_params["artifact_id"]))


async def launch_investigation(request: Request) -> Any:
    from spd_mcp.viewer.launch import launch

    v = _viewer(request)
    body: LaunchRequest = await _body(request, LaunchRequest)
    if not body.question.strip():
        raise BadRequest("the question is empty")
    return await asyncio.to_thread(launch, body.run, body.question.strip(),
                                   investigations_root(), mode=v.launch_mode,
                                   argv=v.launch_argv)


# -- benchmark results -------------------------------------------------------------------------
def bench_root() -> Path:
    """Where ``spd-mcp bench run`` writes its result directories by default."""
    return spd_home() / "bench"


def extra_bench_dirs(paths: Sequence[Path]) -> dict[str, Path]:
    """Result directories given by hand (``spd-mcp view --bench DIR``), keyed by a safe name."""
    out: dict[str, Path] = {}
    for p in paths:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", p.resolve().name).strip("-.")[:100] or "bench"
        if name in out:
            raise ValueError(f"two benchmark directories are both named {name!r}: "
                             f"{out[name]} and {p}")
        out[name] = p
    return out


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _results_files(path: Path) -> list[Path]:
    return [f for f in [path / "results.jsonl", *sorted(path.glob("shard-*/results.jsonl"))]
            if f.is_file()]


def _bench_path(extra: dict[str, Path], name: str) -> Path | None:
    """Results directory ``name``: an extra one, else one under the bench root that is not a link
    leading out of it."""
    if name in extra:
        return extra[name]
    p = bench_root() / name
    return p if SAFE_ID.match(name) and p.is_dir() and _inside(p, bench_root()) else None


def _bench_dirs(extra: dict[str, Path]) -> dict[str, Path]:
    """Every results directory by name (an extra one wins a clash)."""
    root = bench_root()
    names = [p.name for p in root.iterdir()] if root.is_dir() else []
    found = {n: p for n in [*names, *extra] if (p := _bench_path(extra, n)) is not None}
    return found


def _updated(files: list[Path]) -> str:
    ts = max(f.stat().st_mtime for f in files)
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _read(name: str, path: Path) -> list[RunRecord]:
    try:
        return read_results(path)
    except (OSError, ValueError) as err:
        raise BadRequest(f"cannot read the results in {name}: {err}") from None


def _bench_rows(extra: dict[str, Path]) -> list[dict[str, Any]]:
    rows = []
    for name, path in _bench_dirs(extra).items():
        if not (files := _results_files(path)):
            continue
        row: dict[str, Any] = {"name": name, "path": str(path), "updated": _updated(files)}
        try:
            records = _read(name, path)
        except BadRequest as err:  # a broken directory is listed, not fatal
            rows.append({**row, "error": str(err)})
            continue
        if not records:
            continue
        s = summarize(records)
        rows.append({**row, "agents": sorted({r.agent for r in records}),
                     **{k: s[k] for k in ("n_runs", "successes", "success_rate", "ci95",
                                          "cost_usd", "agent_seconds", "grade_seconds")}})
    return sorted(rows, key=lambda r: (r["updated"], r["name"]), reverse=True)


async def bench_list(request: Request) -> Any:
    rows = await asyncio.to_thread(_bench_rows, _viewer(request).bench_dirs)
    return {"root": str(bench_root()), "results": rows}


def _bench_dir(request: Request) -> tuple[str, Path]:
    name = str(request.path_params["name"])
    if not SAFE_ID.match(name):
        raise BadRequest(f"bad benchmark results name {name!r}")
    path = _bench_path(_viewer(request).bench_dirs, name)
    if path is None or not _results_files(path):
        raise NotFound(f"no benchmark results {name!r} under {bench_root()}")
    return name, path


def _bench_task(bench_dir: Path, task_id: str) -> TaskDir | None:
    """Task directory ``task_id`` of a results directory (``tasks/``, or a shard's ``tasks/``)."""
    if not SAFE_ID.match(task_id):
        return None
    for p in [bench_dir / "tasks" / task_id, *sorted(bench_dir.glob(f"shard-*/tasks/{task_id}"))]:
        if TaskDir(p).exists() and _inside(p, bench_dir):
            return TaskDir(p)
    return None


def _task_link(bench_dir: Path, task_dir: str) -> dict[str, str] | None:
    """Where the viewer shows a record's task directory: in its results directory (found by name,
    so moved or sharded results still link), among the investigations, or nowhere (None)."""
    name = Path(task_dir).name
    if not task_dir or not SAFE_ID.match(name):
        return None
    if _bench_task(bench_dir, name) is not None:
        return {"kind": "bench", "id": name}
    if Path(task_dir).parent == investigations_root() and TaskDir(Path(task_dir)).exists():
        return {"kind": "investigation", "id": name}
    return None


def _bench_detail(name: str, path: Path) -> dict[str, Any]:
    records = _read(name, path)
    return {"name": name, "path": str(path), "updated": _updated(_results_files(path)),
            "summary": summarize(records),
            "records": [{**r.model_dump(mode="json"), "task_link": _task_link(path, r.task_dir)}
                        for r in records]}


async def bench_detail(request: Request) -> Any:
    return await asyncio.to_thread(_bench_detail, *_bench_dir(request))


def _bench_task_of(request: Request) -> TaskDir:
    name, path = _bench_dir(request)
    tid = str(request.path_params["task_id"])
    td = _bench_task(path, tid)
    if td is None:
        raise NotFound(f"no task directory {tid!r} in benchmark results {name}")
    return td


async def bench_task(request: Request) -> Any:
    return await asyncio.to_thread(_detail, _bench_task_of(request))


async def bench_artifact(request: Request) -> Any:
    return await _artifact(_bench_task_of(request), str(request.path_params["artifact_id"]))


# -- app ---------------------------------------------------------------------------------------
async def index(_: Request) -> Response:
    return FileResponse(STATIC / "index.html")


def security_headers(app: Any) -> Callable[..., Awaitable[None]]:
    """ASGI middleware adding the CSP (no foreign origins, no inline script) to every response."""

    async def wrapped(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", CSP.encode()),
                            (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer"),
                            (b"cache-control", b"no-store")]
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_with_headers)

    return wrapped


def create_app(
    run: str = "tales", *, device: str = "cpu", session: RunSession | None = None,
    launch_mode: Literal["claude", "scripted"] | None = None,
    launch_argv: list[str] | None = None, bench_dirs: Sequence[Path] = (), worker: bool = False,
) -> Any:
    """The viewer ASGI app (``session`` reuses a loaded run as ``run``, e.g. in tests;
    ``bench_dirs`` are benchmark result directories to list besides those under the bench root;
    ``worker``: heavy analyses in a worker process, as ``spd-mcp serve`` does)."""
    executor = ComputeExecutor(worker=WorkerProcess(threads=torch.get_num_threads())
                               if worker else None)
    viewer = Viewer(default_run=run, device=device, launch_mode=launch_mode,
                    launch_argv=launch_argv, bench_dirs=extra_bench_dirs(bench_dirs),
                    executor=executor)
    if session is not None:
        viewer.sessions[run] = session

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.viewer = viewer
        try:
            yield
        finally:
            await viewer.close()

    routes = [
        Route("/", index),
        Route("/api/runs", api(runs)),
        Route("/api/runs/{run:path}/info", api(run_info)),
        Route("/api/runs/{run:path}/graphs", api(start_graph), methods=["POST"]),
        Route("/api/runs/{run:path}/graphs/{graph_id}", api(get_graph)),
        Route("/api/runs/{run:path}/components/{key}", api(component)),
        Route("/api/runs/{run:path}/interventions", api(start_intervention), methods=["POST"]),
        Route("/api/jobs/{job_id}", api(job_status)),
        Route("/api/investigations", api(investigations)),
        Route("/api/investigations", api(launch_investigation), methods=["POST"]),
        Route("/api/investigations/{task_id}", api(investigation)),
        Route("/api/investigations/{task_id}/artifacts/{artifact_id}", api(artifact)),
        Route("/api/bench", api(bench_list)),
        Route("/api/bench/{name}", api(bench_detail)),
        Route("/api/bench/{name}/tasks/{task_id}", api(bench_task)),
        Route("/api/bench/{name}/tasks/{task_id}/artifacts/{artifact_id}", api(bench_artifact)),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    return security_headers(app)
