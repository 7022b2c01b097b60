"""Label scoring (DESIGN §7): detection and fuzzing of the best label of each component.

Windows are shown with one token marked ``[[like this]]`` and numbered from 1.

**Detection.** Trial ``t`` of component X shows ``n_pos`` positive windows — X's stored harvest
examples, marked at their stored firing offset (never assumed to be the centre) — and ``n_neg``
negative windows, shuffled together. A negative is another component's stored example (the
component drawn uniformly among the other firing components, then one of its examples), marked at
*its* firing token, and kept only if X's natural CI at that token is ``<= neg_ci_max`` (0 by
default, "does not fire at all"). The harvest stores only the example component's own CI, so X's
CI there is recomputed: the document is re-encoded exactly as the harvest did, checked to carry
the window's token at that position, and run through the decomposition (one forward per document,
cached). The model answers ``{"matching": [window numbers]}``. The score is the **balanced
accuracy** ``(TP/P + TN/N) / 2`` of the pooled counts over all successful trials (with only one
class present, that class's rate).

**Fuzzing.** Trial ``t`` shows ``n_windows`` of X's stored examples. ``n_windows // 2`` of them
(those with a usable wrong token, chosen at random) are marked at a wrong token: a position of
the same window whose stored CI of X is ``<= neg_ci_max`` and whose token differs from the firing
token; the rest are marked at the stored firing offset. The model answers
``{"correct": [window numbers]}``; the score is the **accuracy** of these per-window judgements,
pooled over successful trials.

Both constructions are deterministic: X's examples are shuffled with ``Random(f"{seed}:{key}")``
and trial ``t`` takes the next ``n`` of them cyclically; its random choices use
``Random(f"{seed}:{method}:{key}:{t}")``. Answers naming windows outside ``1..n`` are ignored
(counted in ``details["invalid"]``). A component whose trials all failed or were skipped gets no
score row. A score row stores the scored label; on resume a component is re-scored only when its
best label changed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from spd_mcp.keys import ComponentKey

from .client import LLMPool, LLMSettings, map_bounded
from .graph_interp import GraphInterpError, add_ledgers, mark_window, prompt_text

if TYPE_CHECKING:
    from spd_mcp.harvest.examples import ActivationExample
    from spd_mcp.harvest.store import Harvest
    from spd_mcp.model.session import RunSession

    from .store import LabelRow, LabelStore

Method = Literal["detection", "fuzzing"]
METHODS: tuple[Method, ...] = ("detection", "fuzzing")


class ScoringConfig(BaseModel):
    """Trial construction (part of the score stage's config hash)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_trials: int = Field(3, ge=1)
    n_pos: int = Field(5, ge=1, description="detection: firing windows per trial")
    n_neg: int = Field(5, ge=1, description="detection: non-firing windows per trial")
    n_windows: int = Field(6, ge=2, description="fuzzing: windows per trial")
    neg_ci_max: float = Field(0.0, ge=0.0, description="'does not fire' means CI <= this")
    max_candidates: int = Field(
        40, ge=1, description="detection: negative candidates examined per negative needed")
    seed: int = 0


class Window(BaseModel):
    """One shown window: token ids, the marked index and whether the truth is 'yes'."""

    token_ids: list[int]
    marked: int
    truth: bool = Field(description="detection: X fires at the mark; fuzzing: mark is correct")
    source: str = Field("", description="where the window comes from (component key, doc, pos)")


class Trial(BaseModel):
    windows: list[Window]


class DetectionAnswer(BaseModel):
    matching: list[int] = Field(description="window numbers (from 1) that match the label")


class FuzzingAnswer(BaseModel):
    correct: list[int] = Field(description="window numbers (from 1) marked correctly")


class ScoreOutcome(BaseModel):
    run_id: str
    method: str
    stage_id: str
    components: int
    reused: int
    scored: int
    no_score: int = Field(description="components with zero successful trials")
    mean_score: float | None
    cost_usd: float

    @property
    def message(self) -> str:
        mean = "n/a" if self.mean_score is None else f"{self.mean_score:.3f}"
        return (f"{self.method}: {self.components} labelled components, {self.reused} reused, "
                f"{self.scored} scored (mean {mean}), {self.no_score} without a successful "
                f"trial, ${self.cost_usd:.4f}")


# ---------------------------------------------------------------------- trial construction
def _take(items: Sequence[Any], t: int, n: int) -> list[Any]:
    """Trial t's n items of ``items``, cyclically (no repeats within a trial)."""
    if not items:
        return []
    m = min(n, len(items))
    return [items[(t * n + i) % len(items)] for i in range(m)]


def shuffled(items: Sequence[Any], seed: int, key: str) -> list[Any]:
    out = list(items)
    random.Random(f"{seed}:{key}").shuffle(out)
    return out


def detection_trials(key: str, positives: Sequence[Window], negatives: Sequence[Window],
                     cfg: ScoringConfig) -> list[Trial]:
    """``cfg.n_trials`` trials; ``positives`` / ``negatives`` are already in sampling order."""
    trials = []
    for t in range(cfg.n_trials):
        ws = _take(positives, t, cfg.n_pos) + _take(negatives, t, cfg.n_neg)
        random.Random(f"{cfg.seed}:detection:{key}:{t}").shuffle(ws)
        trials.append(Trial(windows=ws))
    return trials


def fuzzing_trials(key: str, examples: Sequence[ActivationExample],
                   cfg: ScoringConfig) -> list[Trial]:
    """``cfg.n_trials`` trials over ``examples`` (in sampling order)."""
    trials = []
    for t in range(cfg.n_trials):
        chosen = _take(examples, t, cfg.n_windows)
        rng = random.Random(f"{cfg.seed}:fuzzing:{key}:{t}")
        wrong_at: dict[int, list[int]] = {}
        for w, ex in enumerate(chosen):
            fire_tok = ex.token_ids[ex.offset]
            cands = [j for j, (tok, ci) in enumerate(zip(ex.token_ids, ex.ci, strict=True))
                     if j != ex.offset and tok != fire_tok and ci <= cfg.neg_ci_max]
            if cands:
                wrong_at[w] = cands
        n_wrong = min(len(chosen) // 2, len(wrong_at))
        wrong = set(rng.sample(sorted(wrong_at), n_wrong))
        ws = []
        for w, ex in enumerate(chosen):
            src = f"{key} doc {ex.doc} pos {ex.pos}"
            if w in wrong:
                ws.append(Window(token_ids=ex.token_ids, marked=rng.choice(wrong_at[w]),
                                 truth=False, source=src))
            else:
                ws.append(Window(token_ids=ex.token_ids, marked=ex.offset, truth=True,
                                 source=src))
        trials.append(Trial(windows=ws))
    return trials


# ---------------------------------------------------------------------------- scoring
def _chosen(answer: Sequence[int], n: int) -> tuple[set[int], int]:
    """0-based indices named by a 1-based answer, and how many entries were out of range."""
    ok = {i - 1 for i in answer if 1 <= i <= n}
    return ok, sum(1 for i in answer if not 1 <= i <= n)


def detection_score(results: Sequence[tuple[Trial, Sequence[int]]]) -> tuple[float, dict]:
    """Balanced accuracy of pooled (trial, answered window numbers) pairs."""
    tp = fn = tn = fp = invalid = 0
    for trial, answer in results:
        said, bad = _chosen(answer, len(trial.windows))
        invalid += bad
        for i, w in enumerate(trial.windows):
            yes = i in said
            tp += w.truth and yes
            fn += w.truth and not yes
            tn += (not w.truth) and not yes
            fp += (not w.truth) and yes
    rates = [r for r in (tp / (tp + fn) if tp + fn else None,
                         tn / (tn + fp) if tn + fp else None) if r is not None]
    score = sum(rates) / len(rates) if rates else 0.0
    return score, {"tp": tp, "fn": fn, "tn": tn, "fp": fp, "invalid": invalid}


def fuzzing_score(results: Sequence[tuple[Trial, Sequence[int]]]) -> tuple[float, dict]:
    """Accuracy of pooled per-window 'marking is correct' judgements."""
    right = total = invalid = 0
    for trial, answer in results:
        said, bad = _chosen(answer, len(trial.windows))
        invalid += bad
        for i, w in enumerate(trial.windows):
            right += (i in said) == w.truth
            total += 1
    return (right / total if total else 0.0), {"right": right, "total": total,
                                               "invalid": invalid}


def trial_prompt(trial: Trial, label: str, tokens: Callable[[list[int]], list[str]],
                 key: str, sep: str = " ") -> str:
    lines = [f"Component: {key}", f'Description: "{label}"', ""]
    for i, w in enumerate(trial.windows):
        lines.append(f"Window {i + 1}: {mark_window(tokens(w.token_ids), w.marked, sep)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------- negatives (model)
class _NegativeSampler:
    """Other components' examples where component X does not fire at the marked token."""

    def __init__(self, session: RunSession, h: Harvest, firing: Sequence[str],
                 cfg: ScoringConfig) -> None:
        self.session, self.h, self.firing, self.cfg = session, h, list(firing), cfg
        self._examples: dict[str, list[ActivationExample]] = {}
        self._docs: dict[int, tuple[list[int], dict[str, Any]]] = {}

    def _doc(self, doc: int) -> tuple[list[int], dict[str, Any]]:
        if doc not in self._docs:
            from spd_mcp.harvest.accumulate import encode_doc

            ids = list(encode_doc(self.session, doc))
            self._docs[doc] = (ids, self.session.natural_ci(ids).ci)
        return self._docs[doc]

    def _exs(self, key: str) -> list[ActivationExample]:
        if key not in self._examples:
            from spd_mcp.harvest.examples import component_examples

            self._examples[key] = component_examples(self.h, key)
        return self._examples[key]

    def windows(self, key: str, n: int) -> list[Window]:
        ck = ComponentKey.parse(key)
        others = [k for k in self.firing if k != key]
        rng = random.Random(f"{self.cfg.seed}:negatives:{key}")
        own = {(e.doc, e.pos) for e in self._exs(key)}
        seen: set[tuple[int, int]] = set()
        out: list[Window] = []
        for _ in range(n * self.cfg.max_candidates):
            if len(out) >= n or not others:
                break
            other = rng.choice(others)
            exs = self._exs(other)
            if not exs:
                continue
            ex = rng.choice(exs)
            where = (ex.doc, ex.pos)
            if where in seen or where in own:
                continue
            seen.add(where)
            ids, ci = self._doc(ex.doc)
            if not (0 <= ex.pos < len(ids)) or ids[ex.pos] != ex.token_ids[ex.offset]:
                continue  # the document does not reproduce the window: not verifiable
            if float(ci[ck.layer][ex.pos, ck.c]) <= self.cfg.neg_ci_max:
                out.append(Window(token_ids=ex.token_ids, marked=ex.offset, truth=False,
                                  source=f"{other} doc {ex.doc} pos {ex.pos}"))
        return out


# ------------------------------------------------------------------------------ the stage
def labelled_components(store: LabelStore, h: Harvest, keys: Sequence[str] | None,
                        limit: int | None) -> dict[str, LabelRow]:
    """Best ok labels to score, in canonical component order (restricted by keys / limit)."""
    best = {k: r for k, r in store.best_labels().items() if r.status == "ok" and r.label}
    order = {k: i for i, k in enumerate(h.stats.keys())}
    comps = sorted((k for k in best if k in order), key=order.__getitem__)
    if keys is not None:
        missing = [k for k in keys if k not in best]
        if missing:
            raise GraphInterpError(f"no ok label to score for {missing[:5]}")
        want = set(keys)
        comps = [k for k in comps if k in want]
    if limit is not None:
        if limit < 1:
            raise GraphInterpError("--limit must be >= 1")
        comps = comps[:limit]
    return {k: best[k] for k in comps}


async def score_labels(
    session: RunSession,
    settings: LLMSettings,
    *,
    method: Method,
    config: ScoringConfig | None = None,
    keys: Sequence[str] | None = None,
    limit: int | None = None,
    store: LabelStore | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ScoreOutcome:
    """Score the best labels with ``method``; writes one ScoreRow per scored component."""
    from spd_mcp.harvest.examples import component_examples
    from spd_mcp.harvest.store import load_harvest, run_id_of

    from .store import LabelStore, ScoreRow

    if method not in METHODS:
        raise GraphInterpError(f"--method must be one of {METHODS}, got {method!r}")
    cfg = config or ScoringConfig()
    run_id = run_id_of(session)
    h = load_harvest(session)
    assert h is not None
    own_store = store is None
    st = store if store is not None else LabelStore.open(run_id)
    pool = LLMPool(settings, stage=f"score_{method}")
    try:
        system = prompt_text(f"scoring_{method}")
        sid = st.stage(f"score_{method}", {
            "model": settings.model, "method": method, "scoring": cfg.model_dump(mode="json"),
            "harvest": h.config_hash,
            "prompt": hashlib.sha256(system.encode()).hexdigest()[:16]})
        todo = labelled_components(st, h, keys, limit)
        prior = st.scores(sid)
        reused = [k for k, r in todo.items()
                  if k in prior and prior[k].details.get("label") == r.label]
        todo = {k: r for k, r in todo.items() if k not in set(reused)}
        counts = h.stats.t["fire_count"]
        firing = [k for i, k in enumerate(h.stats.keys()) if int(counts[i]) > 0]
        sampler = _NegativeSampler(session, h, firing, cfg) if method == "detection" else None

        plans: dict[str, list[Trial]] = {}
        for k in todo:  # construction is sync (model forwards for detection negatives)
            exs = shuffled(component_examples(h, k), cfg.seed, k)
            if sampler is not None:
                pos = [Window(token_ids=e.token_ids, marked=e.offset, truth=True,
                              source=f"{k} doc {e.doc} pos {e.pos}") for e in exs]
                neg = sampler.windows(k, cfg.n_neg * cfg.n_trials)
                plans[k] = detection_trials(k, pos, neg, cfg)
            else:
                plans[k] = fuzzing_trials(k, exs, cfg)
        schema: type[BaseModel] = DetectionAnswer if method == "detection" else FuzzingAnswer
        field = "matching" if method == "detection" else "correct"
        n_done = 0
        scored: list[float] = []
        no_score = 0

        async def one(k: str) -> None:
            nonlocal n_done, no_score
            label = todo[k].label or ""
            trials = [t for t in plans[k] if t.windows]

            async def ask(trial: Trial) -> tuple[Trial, list[int] | None, str | None]:
                prompt = trial_prompt(trial, label, session.tokens, k, session.token_sep)
                res = await pool.ask_json(system, prompt, schema)
                if res.status != "ok" or res.value is None:
                    return trial, None, res.error or res.status
                return trial, list(res.value[field]), None

            answers = await map_bounded(trials, ask, limit=max(1, len(trials)))
            good = [(t, a) for t, a, _ in answers if a is not None]
            errors = [e for _, a, e in answers if a is None and e]
            n_done += 1
            if progress is not None:
                progress(n_done, len(todo))
            if not good:
                no_score += 1
                return
            fn = detection_score if method == "detection" else fuzzing_score
            score, details = fn(good)
            details.update({"label": label, "label_stage": todo[k].stage_id,
                            "windows_true": sum(w.truth for t in trials for w in t.windows),
                            "windows_false": sum(not w.truth for t in trials for w in t.windows),
                            "errors": errors[:3]})
            st.put_score(ScoreRow(stage_id=sid, component=k, method=method, score=score,
                                  n_trials=len(trials), n_success=len(good), details=details))
            scored.append(score)

        await map_bounded(list(todo), one, limit=max(1, settings.max_concurrency))
        prev = st.ledger(sid)
        st.put_ledger(sid, add_ledgers(prev, pool.ledger))
    finally:
        await pool.aclose()
        if own_store:
            st.close()
    return ScoreOutcome(
        run_id=run_id, method=method, stage_id=sid, components=len(todo) + len(reused),
        reused=len(reused), scored=len(scored), no_score=no_score,
        mean_score=sum(scored) / len(scored) if scored else None, cost_usd=pool.ledger.cost_usd,
    )
