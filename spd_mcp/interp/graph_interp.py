"""Graph-interp (DESIGN §7): three labelling passes that use the dataset-attribution graph.

- **output pass** (``graph_interp_output``), layers late → early: a component's prompt has its
  activation examples and token statistics, its strongest *downstream* targets (dataset
  attributions; components in strictly later layers, plus output tokens) and its co-firing
  components; a related component's label is shown only when it is downstream and was labelled
  earlier *in this pass*. A layer starts only after every later layer is finished; the
  components of one layer are labelled concurrently.
- **input pass** (``graph_interp_input``), layers early → late, the mirror image with upstream
  sources (components in strictly earlier layers, plus input tokens).
- **unification** (``graph_interp_unified``): one label per component from its output- and
  input-pass labels and a few examples.

The two directional passes are independent and run concurrently; unification runs after both.
Each pass is a store stage keyed by its config hash (model, prompt text, harvest and attribution
stages, context sizes); rows already finished are reused, so an interrupted run resumes. A pass
is marked DONE only when it covered every firing component (no ``keys`` / ``limit``) with a
finished (``ok`` or ``failed``) row. With a budget, each directional pass may spend a third
of it and unification the rest; asks the budget refuses are stored as ``skipped`` rows (retried
on resume).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from spd_mcp.errors import InputError
from spd_mcp.keys import layer_of, split_first

from .client import CostLedger, LLMPool, LLMSettings, map_bounded

if TYPE_CHECKING:
    from spd_mcp.attributions.store import Attributions
    from spd_mcp.harvest.store import Harvest
    from spd_mcp.model.session import RunSession

    from .store import LabelRow, LabelStore

OUTPUT_KIND = "graph_interp_output"
INPUT_KIND = "graph_interp_input"
UNIFIED_KIND = "graph_interp_unified"
PassKind = Literal["graph_interp_output", "graph_interp_input", "graph_interp_unified"]
PROMPTS = Path(__file__).resolve().parent.parent / "prompts"
MAX_LABEL_WORDS = 8


class GraphInterpError(InputError):
    """A graph-interp run cannot start (missing harvest / attributions, bad keys)."""


class GraphInterpConfig(BaseModel):
    """What goes into each prompt (part of every pass's config hash)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_examples: int = Field(10, ge=1, description="activation examples shown")
    n_tokens: int = Field(8, ge=1, description="input / predicted tokens shown (by PMI)")
    n_related: int = Field(6, ge=1, description="attribution neighbours shown (components)")
    n_token_edges: int = Field(5, ge=0, description="direct token sources / targets shown")
    n_cofiring: int = Field(4, ge=0, description="co-firing components shown (by Jaccard)")


class LabelAnswer(BaseModel):
    """The answer schema of every graph-interp prompt."""

    label: str = Field(description=f"at most {MAX_LABEL_WORDS} words")
    confidence: float = Field(ge=0.0, le=1.0)
    reasoning: str

    @field_validator("label")
    @classmethod
    def _short(cls, v: str) -> str:
        v = " ".join(v.split())
        if not v:
            raise ValueError("label is empty")
        if len(v.split()) > MAX_LABEL_WORDS:
            raise ValueError(f"label has {len(v.split())} words; at most {MAX_LABEL_WORDS}")
        return v


class PassOutcome(BaseModel):
    kind: str
    stage_id: str
    components: int
    reused: int = Field(description="components already finished in the store")
    ok: int
    failed: int
    skipped: int
    cost_usd: float
    done: bool = Field(description="the stage is complete (DONE-gated)")


class GraphInterpOutcome(BaseModel):
    run_id: str
    passes: list[PassOutcome]

    @property
    def message(self) -> str:
        return "\n".join(
            f"{p.kind}: {p.components} components ({p.reused} reused), {p.ok} ok, "
            f"{p.failed} failed, {p.skipped} skipped, ${p.cost_usd:.4f}"
            + (" [DONE]" if p.done else "")
            for p in self.passes
        )


# ------------------------------------------------------------------------------ prompts
def prompt_text(name: str) -> str:
    return (PROMPTS / f"{name}.md").read_text()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def mark_window(tokens: Sequence[str], marked: int, sep: str = " ") -> str:
    """Window text with token ``marked`` in [[double brackets]] (``sep`` joins tokens)."""
    return sep.join(f"[[{t}]]" if i == marked else t for i, t in enumerate(tokens))


@dataclass
class _Evidence:
    """Harvest / attribution context of a run, with per-component prompt fragments."""

    session: RunSession
    h: Harvest
    attr: Attributions
    cfg: GraphInterpConfig
    layer_index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.layer_index = {name: i for i, name in enumerate(self.session.layers)}

    def header(self, key: str) -> str:
        i = self.h.stats.index(key)
        n = int(self.h.stats.t["fire_count"][i])
        dens = float(self.h.stats.density()[i])
        return f"Component: {key}\nLayer: {layer_of(key)}\nFires on {n} tokens ({dens:.3%})."

    def examples(self, key: str, k: int | None = None) -> str:
        from spd_mcp.harvest.examples import component_examples

        exs = component_examples(self.h, key, k=k or self.cfg.n_examples, order="ci")
        sep = self.session.token_sep
        lines = [
            f"{j + 1}. {mark_window(self.session.tokens(e.token_ids), e.offset, sep)}"
            f"  (CI {e.firing_ci:.2f})"
            for j, e in enumerate(exs)
        ]
        return "Activation examples (the firing token in [[double brackets]]):\n" + (
            "\n".join(lines) or "(none stored)")

    def token_stats(self, key: str) -> str:
        from spd_mcp.harvest.stats import top_tokens

        out = []
        for kind, title in (("input", "Tokens it fires on"),
                            ("output", "Next tokens the model predicts when it fires")):
            toks = top_tokens(self.h.stats, key, kind=kind, by="smoothed_pmi", k=self.cfg.n_tokens)  # type: ignore[arg-type]
            items = ", ".join(
                f"'{self.session.token_str(t.token_id)}' (P={t.precision:.2f}, n={t.count})"
                for t in toks)
            out.append(f"{title} (by PMI): {items or '(none)'}")
        return "\n".join(out)

    def neighbours(self, key: str, direction: Literal["down", "up"]) -> tuple[
            list[tuple[str, float]], list[tuple[str, float]]]:
        """(components strictly downstream / upstream, token ends) with attribution fractions."""
        from spd_mcp.attributions.query import top_sources, top_targets

        here = self.layer_index[layer_of(key)]
        fn = top_targets if direction == "down" else top_sources
        comp_kind = "component"
        tok_kind = "output_token" if direction == "down" else "input_token"
        comps = fn(self.attr, key, self.cfg.n_related * 3, signed=False, normalize="fraction",
                   include=[comp_kind])  # type: ignore[list-item]
        keep = [
            (e.key, e.value) for e in comps
            if (self.layer_index[layer_of(e.key)] > here if direction == "down"
                else self.layer_index[layer_of(e.key)] < here)
        ][: self.cfg.n_related]
        toks: list[tuple[str, float]] = []
        if self.cfg.n_token_edges:
            for e in fn(self.attr, key, self.cfg.n_token_edges, signed=False,
                        normalize="fraction", include=[tok_kind]):  # type: ignore[list-item]
                tid = int((split_first(e.key) or ("", e.key))[1])
                toks.append((self.session.token_str(tid), e.value))
        return keep, toks

    def cofiring(self, key: str) -> list[tuple[str, float]]:
        from spd_mcp.harvest.stats import correlated

        if not self.cfg.n_cofiring:
            return []
        return [(c.key, c.jaccard) for c in correlated(self.h.stats, key, by="jaccard",
                                                       k=self.cfg.n_cofiring)]


def _label_note(key: str, labels: dict[str, LabelRow], allowed: Callable[[str], bool]) -> str:
    row = labels.get(key)
    if allowed(key) and row is not None and row.status == "ok" and row.label:
        return f'"{row.label}"'
    return "(no label)"


def directional_prompt(ev: _Evidence, key: str, kind: PassKind,
                       labels: dict[str, LabelRow]) -> tuple[str, list[str]]:
    """(user prompt, related component keys) for the output or input pass.

    ``labels`` are this pass's finished labels; only those of components strictly downstream
    (output pass) / upstream (input pass) of ``key`` are shown.
    """
    here = ev.layer_index[layer_of(key)]
    down = kind == OUTPUT_KIND

    def allowed(other: str) -> bool:
        there = ev.layer_index[layer_of(other)]
        return there > here if down else there < here

    comps, toks = ev.neighbours(key, "down" if down else "up")
    co = ev.cofiring(key)
    parts = [ev.header(key), ev.examples(key), ev.token_stats(key)]
    title = ("Downstream components it writes to most (share of their total attribution; "
             "their output-function labels)" if down else
             "Upstream components that drive it most (share of its total attribution; their "
             "input-function labels)")
    parts.append(title + ":\n" + ("\n".join(
        f"- {k} ({v:+.4f}): {_label_note(k, labels, allowed)}" for k, v in comps) or "(none)"))
    if toks:
        tt = ("Output tokens it affects directly" if down else
              "Input tokens that drive it directly")
        parts.append(f"{tt}: " + ", ".join(f"'{t}' ({v:+.4f})" for t, v in toks))
    if co:
        parts.append("Components it co-fires with (Jaccard; labels only for "
                     f"{'downstream' if down else 'upstream'} ones from this pass):\n" + "\n".join(
                         f"- {k} ({j:.2f}): {_label_note(k, labels, allowed)}" for k, j in co))
    related = list(dict.fromkeys([k for k, _ in comps] + [k for k, _ in co]))
    return "\n\n".join(parts), related


def unified_prompt(ev: _Evidence, key: str, out_row: LabelRow | None,
                   in_row: LabelRow | None) -> str:
    def show(row: LabelRow | None) -> str:
        if row is None or row.status != "ok" or not row.label:
            return "(no label)"
        return f'"{row.label}" (confidence {row.confidence:.2f}): {row.reasoning or ""}'.strip()

    return "\n\n".join([
        ev.header(key),
        f"Input function (what makes it fire): {show(in_row)}",
        f"Output function (what it does downstream): {show(out_row)}",
        ev.examples(key, k=min(6, ev.cfg.n_examples)),
    ])


# ------------------------------------------------------------------------------ passes
def add_ledgers(prev: CostLedger | None, new: CostLedger) -> CostLedger:
    """A stage's cumulative ledger after one more invocation."""
    if prev is None:
        return new
    return CostLedger(**{k: getattr(prev, k) + getattr(new, k) for k in CostLedger.model_fields})


def firing_components(h: Harvest, layers: Sequence[str], keys: Sequence[str] | None,
                      limit: int | None) -> list[str]:
    """Components to label, in canonical order: those that fire, optionally restricted.

    ``keys``: exactly these (each must fire); ``limit``: the N most frequently firing.
    """
    counts = h.stats.t["fire_count"]
    all_keys = h.stats.keys()
    firing = [k for i, k in enumerate(all_keys) if int(counts[i]) > 0]
    if keys is not None:
        fset = set(firing)
        known = set(all_keys)
        bad = [k for k in keys if k not in known]
        if bad:
            raise GraphInterpError(f"unknown component keys {bad[:5]}; use 'LAYER:C' with layers "
                                   f"{', '.join(layers)}")
        silent = [k for k in keys if k not in fset]
        if silent:
            raise GraphInterpError(f"components {silent[:5]} never fire in the harvest")
        want = set(keys)
        firing = [k for k in firing if k in want]
    if limit is not None:
        if limit < 1:
            raise GraphInterpError("--limit must be >= 1")
        idx = {k: i for i, k in enumerate(all_keys)}
        top = sorted(firing, key=lambda k: (-int(counts[idx[k]]), idx[k]))[:limit]
        keep = set(top)
        firing = [k for k in firing if k in keep]
    return firing


def _split_budget(settings: LLMSettings, share: float, concurrency: int) -> LLMSettings:
    upd: dict[str, object] = {"max_concurrency": max(1, concurrency)}
    if settings.budget_usd is not None:
        upd["budget_usd"] = max(0.0, settings.budget_usd * share)
    return settings.model_copy(update=upd)


@dataclass
class _PassRun:
    kind: PassKind
    stage_id: str
    store: LabelStore
    pool: LLMPool
    system: str
    complete_selection: bool
    labels: dict[str, LabelRow] = field(default_factory=dict)
    reused: int = 0
    new: list[LabelRow] = field(default_factory=list)

    def start(self, comps: Sequence[str]) -> list[str]:
        """Load this stage's finished rows; the components still to do."""
        self.labels = dict(self.store.labels(self.stage_id))
        done = self.store.finished(self.stage_id)
        self.reused = sum(1 for k in comps if k in done)
        return [k for k in comps if k not in done]

    async def label(self, key: str, user: str, related: list[str]) -> LabelRow:
        from .store import LabelRow

        res = await self.pool.ask_json(self.system, user, LabelAnswer)
        val = LabelAnswer.model_validate(res.value) if res.status == "ok" and res.value else None
        row = LabelRow(
            stage_id=self.stage_id, kind=self.kind, component=key, status=res.status,
            label=val.label if val else None, confidence=val.confidence if val else None,
            reasoning=val.reasoning if val else None, related=related, error=res.error,
            cost_usd=res.cost_usd,
        )
        self.store.put_label(row)
        self.labels[key] = row
        self.new.append(row)
        return row

    def finish(self, comps: Sequence[str]) -> PassOutcome:
        prev = self.store.ledger(self.stage_id)
        ledger = self.pool.ledger
        self.store.put_ledger(self.stage_id, add_ledgers(prev, ledger))
        rows = [self.labels[k] for k in comps if k in self.labels]
        ok = sum(r.status == "ok" for r in rows)
        finished = self.store.finished(self.stage_id)
        if (self.complete_selection and all(k in finished for k in comps)
                and not self.store.is_done(self.stage_id)):
            self.store.mark_done(self.stage_id)
        return PassOutcome(
            kind=self.kind, stage_id=self.stage_id, components=len(comps), reused=self.reused,
            ok=ok, failed=sum(r.status == "failed" for r in rows),
            skipped=sum(r.status == "skipped" for r in rows),
            cost_usd=self.pool.ledger.cost_usd, done=self.store.is_done(self.stage_id),
        )


async def _directional(run: _PassRun, ev: _Evidence, comps: list[str], limit: int,
                       progress: Callable[[str, int, int], None] | None) -> PassOutcome:
    todo = set(run.start(comps))
    order = ev.session.layers if run.kind == INPUT_KIND else list(reversed(ev.session.layers))
    by_layer: dict[str, list[str]] = {}
    for k in comps:
        by_layer.setdefault(layer_of(k), []).append(k)
    finished = len(comps) - len(todo)
    for layer in order:  # a layer only after every earlier-processed layer has finished
        keys = [k for k in by_layer.get(layer, []) if k in todo]
        if not keys:
            continue
        prompts = {k: directional_prompt(ev, k, run.kind, run.labels) for k in keys}

        async def one(k: str, prompts: dict[str, tuple[str, list[str]]] = prompts) -> None:
            nonlocal finished
            await run.label(k, *prompts[k])
            finished += 1
            if progress is not None:
                progress(run.kind, finished, len(comps))

        await map_bounded(keys, one, limit=limit)
    return run.finish(comps)


async def graph_interp(
    session: RunSession,
    settings: LLMSettings,
    *,
    config: GraphInterpConfig | None = None,
    keys: Sequence[str] | None = None,
    limit: int | None = None,
    store: LabelStore | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> GraphInterpOutcome:
    """Run the output, input and unification passes over the run's firing components.

    ``keys`` / ``limit`` restrict the components (see :func:`firing_components`); the passes'
    stages are then resumable but not marked DONE. ``progress(kind, finished, total)``.
    """
    from spd_mcp.attributions.store import load_attributions
    from spd_mcp.harvest.store import load_harvest, run_id_of

    from .store import LabelStore

    cfg = config or GraphInterpConfig()
    run_id = run_id_of(session)
    h = load_harvest(session)
    assert h is not None
    attr = load_attributions(session, missing_ok=True)
    if attr is None:
        raise GraphInterpError(
            f"run {run_id!r} has no dataset attributions; graph-interp needs them: build them "
            f"with `spd-mcp attributions {session.run.name}` (or `spd-mcp prepare "
            f"{session.run.name}`)")
    comps = firing_components(h, session.layers, keys, limit)
    complete = keys is None and limit is None
    ev = _Evidence(session, h, attr, cfg)
    own_store = store is None
    st = store if store is not None else LabelStore.open(run_id)
    base = {
        "model": settings.model, "graph": cfg.model_dump(mode="json"),
        "harvest": h.config_hash, "attributions": attr.config_hash,
    }
    half = max(1, settings.max_concurrency // 2)
    runs: dict[str, _PassRun] = {}
    pools: list[LLMPool] = []
    for kind in (OUTPUT_KIND, INPUT_KIND):
        system = prompt_text(kind)
        sid = st.stage(kind, {**base, "prompt": _digest(system)})
        pool = LLMPool(_split_budget(settings, 1 / 3, half), stage=kind)
        pools.append(pool)
        runs[kind] = _PassRun(kind, sid, st, pool, system, complete)  # type: ignore[arg-type]
    try:
        out_res, in_res = await asyncio.gather(
            *(_directional(runs[k], ev, comps, 2 * half, progress)
              for k in (OUTPUT_KIND, INPUT_KIND)))
        spent = out_res.cost_usd + in_res.cost_usd
        uni_settings = settings if settings.budget_usd is None else settings.model_copy(
            update={"budget_usd": max(0.0, settings.budget_usd - spent)})
        system = prompt_text(UNIFIED_KIND)
        sid = st.stage(UNIFIED_KIND, {
            **base, "prompt": _digest(system), "output_stage": runs[OUTPUT_KIND].stage_id,
            "input_stage": runs[INPUT_KIND].stage_id})
        pools.append(LLMPool(uni_settings, stage=UNIFIED_KIND))
        uni = _PassRun(UNIFIED_KIND, sid, st, pools[-1], system, complete)
        uni_res = await _unify(uni, ev, comps, runs[OUTPUT_KIND].labels,
                               runs[INPUT_KIND].labels, progress)
    finally:
        for pool in pools:
            await pool.aclose()
        if own_store:
            st.close()
    return GraphInterpOutcome(run_id=run_id, passes=[out_res, in_res, uni_res])


async def _unify(run: _PassRun, ev: _Evidence, comps: list[str], out_labels: dict[str, LabelRow],
                 in_labels: dict[str, LabelRow],
                 progress: Callable[[str, int, int], None] | None) -> PassOutcome:
    from .store import LabelRow

    todo = run.start(comps)
    finished = len(comps) - len(todo)

    async def one(k: str) -> None:
        nonlocal finished
        o, i = out_labels.get(k), in_labels.get(k)
        if not any(r is not None and r.status == "ok" for r in (o, i)):
            row = LabelRow(stage_id=run.stage_id, kind=run.kind, component=k, status="skipped",
                           label=None, confidence=None, reasoning=None, related=[],
                           error="no ok output- or input-pass label to unify", cost_usd=0.0)
            run.store.put_label(row)
            run.labels[k] = row
        else:
            await run.label(k, unified_prompt(ev, k, o, i), [])
        finished += 1
        if progress is not None:
            progress(run.kind, finished, len(comps))

    await run.pool.map_bounded(todo, one)
    return run.finish(comps)
