"""One-shot autointerp (DESIGN §7): one label per component from activation examples and token
statistics, resumable by config hash, with explicit failed / skipped rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from importlib import resources
from typing import Any

from pydantic import BaseModel, Field, field_validator

from spd_mcp.keys import ComponentKey

from .client import CostLedger, LLMPool, LLMSettings
from .store import LabelRow, LabelStore, config_hash

KIND = "autointerp"
N_EXAMPLES = 12
N_TOKENS = 8
MAX_LABEL_WORDS = 8
MARK_OPEN, MARK_CLOSE = "«", "»"

Progress = Callable[[int, int], None]


class AutoLabel(BaseModel):
    """The answer schema."""

    label: str = Field(description=f"at most {MAX_LABEL_WORDS} words")
    confidence: float = Field(ge=0, le=1)
    reasoning: str

    @field_validator("label")
    @classmethod
    def _short(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("label is empty")
        if len(v.split()) > MAX_LABEL_WORDS:
            raise ValueError(f"label has {len(v.split())} words; at most {MAX_LABEL_WORDS}")
        return v


def prompt_text(name: str) -> str:
    """A prompt template shipped as package data (``spd_mcp/prompts/NAME``)."""
    return resources.files("spd_mcp").joinpath("prompts", name).read_text(encoding="utf-8")


def prompt_version() -> str:
    """Hash of the autointerp prompts (part of the stage config, so edits relabel)."""
    blob = prompt_text("autointerp_system.md") + "\0" + prompt_text("autointerp_user.md")
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def select_components(harvest: Any, limit: int | None = None) -> list[str]:
    """Components that fired in the harvest, densest first, at most ``limit``."""
    stats = harvest.stats
    dens = stats.density().tolist()
    fired = stats.t["fire_count"].tolist()
    order = sorted((i for i in range(stats.n_components) if fired[i] > 0),
                   key=lambda i: -dens[i])
    return [stats.key(i) for i in order[:limit]]


def mark_window(tokens: list[str], offset: int, sep: str = " ") -> str:
    """Window text with the token at ``offset`` (the stored firing offset) marked «like this»;
    ``sep`` joins tokens (the session's ``token_sep``: nothing between subword pieces)."""
    if not 0 <= offset < len(tokens):
        raise ValueError(f"firing offset {offset} outside a window of {len(tokens)} tokens")
    return sep.join(f"{MARK_OPEN}{t}{MARK_CLOSE}" if i == offset else t
                    for i, t in enumerate(tokens))


def _token_lines(session: Any, assocs: list[Any]) -> str:
    if not assocs:
        return "  (none)"
    return "\n".join(
        f"  {session.token_str(a.token_id)!r}  pmi {a.pmi:.2f}  prec {a.precision:.3f}  "
        f"recall {a.recall:.3f}  n={a.count}" for a in assocs)


def build_prompts(session: Any, harvest: Any, key: str, *, n_examples: int = N_EXAMPLES
                  ) -> tuple[str, str]:
    """(system, user) prompts for one component."""
    from spd_mcp.harvest import component_examples, component_summary, top_tokens

    stats = harvest.stats
    summ = component_summary(stats, key)
    ck = ComponentKey.parse(summ.key)
    ins = top_tokens(stats, key, kind="input", by="smoothed_pmi", k=N_TOKENS, min_count=2)
    outs = top_tokens(stats, key, kind="output", by="smoothed_pmi", k=N_TOKENS, min_count=2)
    examples = component_examples(harvest, key, k=n_examples, order="ci")
    lines = [f"  {j + 1}. {mark_window(session.tokens(ex.token_ids), ex.offset, session.token_sep)}"
             f"   (CI {ex.firing_ci:.2f})" for j, ex in enumerate(examples)]
    user = prompt_text("autointerp_user.md").format(
        component=summ.key, layer=ck.layer, index=ck.c, density_pct=100 * summ.density,
        mean_ci_fire=summ.mean_ci_when_firing, input_tokens=_token_lines(session, ins),
        output_tokens=_token_lines(session, outs), n_examples=len(examples),
        examples="\n".join(lines) or "  (none stored)")
    return prompt_text("autointerp_system.md"), user


def stage_config(harvest: Any, keys: list[str] | None, settings: LLMSettings, *,
                 n_examples: int = N_EXAMPLES) -> dict[str, Any]:
    """What the labels depend on (its hash keys the stage; budget/concurrency do not)."""
    return {
        "model": settings.model, "prompt_version": prompt_version(), "n_examples": n_examples,
        "n_tokens": N_TOKENS, "max_tokens": settings.max_tokens, "harvest": harvest.config_hash,
        "n_components": None if keys is None else len(keys),
        "components": None if keys is None else config_hash({"keys": keys}),
    }


async def _label(pool: LLMPool, session: Any, harvest: Any, key: str, stage_id: str, kind: str,
                 n_examples: int) -> LabelRow:
    system, user = build_prompts(session, harvest, key, n_examples=n_examples)
    res = await pool.ask_json(system, user, AutoLabel)
    row = LabelRow(stage_id=stage_id, kind=kind, component=key, status=res.status,
                   error=res.error, cost_usd=res.cost_usd)
    if res.status == "ok" and res.value is not None:
        ans = AutoLabel.model_validate(res.value)
        row = row.model_copy(update={"label": ans.label, "confidence": ans.confidence,
                                     "reasoning": ans.reasoning})
    return row


async def label_components(session: Any, harvest: Any, keys: list[str], settings: LLMSettings,
                           store: LabelStore, *, kind: str = KIND,
                           progress: Progress | None = None,
                           n_examples: int = N_EXAMPLES) -> str:
    """Label ``keys`` (resuming the stage of this config); returns the stage id.

    Finished components (ok / failed rows) are not asked again; the stage is marked done once all
    are finished. Budget or circuit-breaker stops leave "skipped" rows, retried on re-run.
    """
    stage_id = store.stage(kind, stage_config(harvest, keys, settings, n_examples=n_examples))
    if store.is_done(stage_id):
        if progress:
            progress(len(keys), len(keys))
        return stage_id
    finished = store.finished(stage_id)
    todo = [k for k in keys if k not in finished]
    prev = store.ledger(stage_id) or CostLedger()
    pool = LLMPool(settings, stage=stage_id)
    count = len(keys) - len(todo)
    if progress:
        progress(count, len(keys))

    async def one(key: str) -> None:
        nonlocal count
        row = await _label(pool, session, harvest, key, stage_id, kind, n_examples)
        store.put_label(row)
        store.put_ledger(stage_id, prev + pool.ledger)
        count += 1
        if progress:
            progress(count, len(keys))

    try:
        await pool.map_bounded(todo, one)
    finally:
        store.put_ledger(stage_id, prev + pool.ledger)
        await pool.aclose()
    if set(keys) <= store.finished(stage_id):
        store.mark_done(stage_id)
    return stage_id


async def label_one(session: Any, harvest: Any, key: str, settings: LLMSettings,
                    store: LabelStore, *, refresh: bool = False,
                    n_examples: int = N_EXAMPLES) -> LabelRow:
    """Label one component on demand (stage ``autointerp`` with no component list).

    An existing "ok" label of the same configuration is returned unless ``refresh``.
    """
    stage_id = store.stage(KIND, stage_config(harvest, None, settings, n_examples=n_examples))
    key = harvest.stats.key(harvest.stats.index(key))  # validate / normalise
    if not refresh:
        have = store.labels(stage_id).get(key)
        if have is not None and have.status == "ok":
            return have
    pool = LLMPool(settings, stage=stage_id)
    try:
        row = await _label(pool, session, harvest, key, stage_id, KIND, n_examples)
    finally:
        await pool.aclose()
    store.put_label(row)
    store.put_ledger(stage_id, (store.ledger(stage_id) or CostLedger()) + pool.ledger)
    return row
