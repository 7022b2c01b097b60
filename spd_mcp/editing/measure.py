"""What an edit did: KL and perplexity on held-out text, token-group shifts, probes, planted
behaviours, greedy generations side by side, and a random-components control of the same size.

Every comparison is against the exact target (the run's own weights, weight delta included), so an
effect is the edit's and not reconstruction error.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from spd_mcp.errors import AnalysisError
from spd_mcp.keys import ComponentKey, layer_of
from spd_mcp.model.session import RunSession
from spd_mcp.model.text import Batch, document_batches, documents, generate, prompt_batch

from .edit import ComponentScale, Edit, ScaledComponent, edited_forward, edited_logits, scale_edit

PROBE_SEED = 99
"""Probes for planted behaviours are drawn from this corpus seed (held out from SPD and edits)."""
MAX_PROBES = 500
MAX_GROUP_TOKENS = 64
MAX_FAILING = 8
"""Failing probes listed per probe set or behaviour."""
TAIL_WORDS = 10
"""Words of a failing probe's prompt shown (its end)."""


class Probe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    expected: str = Field(description="the token expected after the prompt (target's answer)")


class MeasureSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_texts: int = Field(64, ge=1, le=2000, description="held-out documents for KL / perplexity")
    token_groups: dict[str, list[str]] = Field(
        default_factory=dict, description="name → tokens; mean summed probability over text")
    probes: list[Probe] = Field(default_factory=list)
    generation_prompts: list[str] = Field(default_factory=list, max_length=16)
    max_new_tokens: int = Field(12, ge=1, le=64)
    behaviours: bool = Field(True, description="planted-behaviour accuracy (runs that have them)")
    n_behaviour_probes: int = Field(50, ge=1, le=500)
    control: bool = Field(True, description="also measure a random edit of the same size")
    control_seed: int = 0
    batch_size: int = Field(16, ge=1, le=256)


class TextMetrics(BaseModel):
    n_tokens: int
    kl: float = Field(description="mean KL(target ‖ edited), nats/token")
    kl_max_token: float
    kl_outside_groups: float | None = Field(
        None, description="mean KL over positions whose target top-1 is in no token group (the "
                          "text unrelated to the groups); None without groups")
    ppl_target: float
    ppl_edited: float
    ppl_change_pct: float


class GroupShift(BaseModel):
    group: str
    tokens: list[str]
    target: float = Field(description="mean Σ p(group) per held-out token, target")
    edited: float
    shift: float


class ProbeRow(BaseModel):
    prompt: str
    expected: str
    target_prob: float
    edited_prob: float
    target_top1: str
    edited_top1: str


class FailedProbe(BaseModel):
    prompt_tail: str = Field(description=f"the prompt's last {TAIL_WORDS} words")
    expected: str
    got: str = Field(description="the edited model's top-1")
    prob: float = Field(description="edited P(expected)")
    target_got: str = Field(description="the target's top-1 (== expected: the edit broke it)")


class ProbeSummary(BaseModel):
    n: int
    target_prob: float = Field(description="mean P(expected), target")
    edited_prob: float
    drop_pct: float = Field(description="100·(1 − edited/target) of the mean probabilities")
    target_accuracy: float = Field(description="fraction whose top-1 is the expected token")
    edited_accuracy: float
    n_failing: int = Field(0, description="probes whose edited top-1 is not the expected token")
    failing: list[FailedProbe] = Field(default_factory=list, description=(
        f"the first {MAX_FAILING} of them, edit-broken first (not listed for the control)"))


class BehaviourAccuracy(BaseModel):
    behaviour: str
    n: int
    target: float
    edited: float
    n_failing: int = Field(0, description="probes whose edited top-1 is not the expected token")
    failing: list[FailedProbe] = Field(
        default_factory=list, description=f"the first {MAX_FAILING} of them (edit-broken first)")


class GenerationPair(BaseModel):
    prompt: str
    target: str
    edited: str


class ControlResult(BaseModel):
    components: list[str]
    text: TextMetrics
    probes: ProbeSummary | None
    token_groups: list[GroupShift]
    note: str


class EditMeasurement(BaseModel):
    components: list[str]
    text: TextMetrics
    token_groups: list[GroupShift]
    probes: ProbeSummary | None
    probe_rows: list[ProbeRow] = Field(description="first 50 probes")
    behaviours: list[BehaviourAccuracy]
    generations: list[GenerationPair]
    control: ControlResult | None
    concentration: dict[str, float] | None = Field(
        None, description="edit effect ÷ control effect (probe drop ratio, KL ratio)")
    notes: list[str] = []


# ------------------------------------------------------------------------------ primitives
def _logprobs(session: RunSession, edit: Edit | None, ids: Tensor) -> Tensor:
    logits = session.cm.target(ids) if edit is None else edited_logits(session, edit, ids)
    return F.log_softmax(logits.float(), -1)


def _groups(session: RunSession, groups: dict[str, list[str]]) -> dict[str, Tensor]:
    out = {}
    for name, toks in groups.items():
        if not toks or len(toks) > MAX_GROUP_TOKENS:
            raise AnalysisError(
                f"token group {name!r} must have 1..{MAX_GROUP_TOKENS} tokens, got {len(toks)}")
        out[name] = torch.tensor([session.token_id(t) for t in toks], device=session.device)
    return out


def _nll(lp: Tensor, follow: Tensor, nxt: Tensor) -> float:
    """Σ log p(next token) over positions with a real next token (negated by the caller)."""
    return float((lp[:, :-1].gather(-1, follow[..., None])[..., 0] * nxt[:, :-1]).sum())


@torch.no_grad()
def text_metrics(
    session: RunSession, edits: Sequence[Edit], batches: Sequence[Batch],
    groups: dict[str, Tensor],
) -> tuple[list[TextMetrics], list[dict[str, tuple[float, float]]]]:
    """KL / perplexity / group probability for several edits over the same held-out batches."""
    n = len(edits)
    kl = [0.0] * n
    kl_out = [0.0] * n
    n_out = 0.0
    kl_max = [0.0] * n
    nll_t = 0.0
    nll_e = [0.0] * n
    gsum_t = {g: 0.0 for g in groups}
    gsum_e = [{g: 0.0 for g in groups} for _ in edits]
    tokens = 0.0
    for b in batches:
        ids, mask = b.ids, b.mask
        nxt = mask.clone()
        nxt[:, -1] = False
        nxt[:, :-1] &= mask[:, 1:]  # positions that have a real next token
        tgt = _logprobs(session, None, ids)
        pt = tgt.exp()
        tokens += float(mask.sum())
        follow = ids[:, 1:]
        nll_t -= _nll(tgt, follow, nxt)
        for g, idx in groups.items():
            gsum_t[g] += float((pt[..., idx].sum(-1) * mask).sum())
        outside = mask.clone()
        if groups:
            every = torch.cat(list(groups.values()))
            outside &= ~torch.isin(tgt.argmax(-1), every)
        n_out += float(outside.sum())
        for i, e in enumerate(edits):
            lp = _logprobs(session, e, ids)
            k = (pt * (tgt - lp)).sum(-1) * mask  # (B, T)
            kl[i] += float(k.sum())
            kl_out[i] += float((k * outside).sum())
            kl_max[i] = max(kl_max[i], float(k.max()))
            nll_e[i] -= _nll(lp, follow, nxt)
            pe = lp.exp() if groups else None
            for g, idx in groups.items():
                assert pe is not None
                gsum_e[i][g] += float((pe[..., idx].sum(-1) * mask).sum())
    n_pred = sum(float(b.mask[:, 1:].sum()) for b in batches)
    ppl_t = float(torch.tensor(nll_t / n_pred).exp())
    metrics = []
    for i in range(n):
        ppl_e = float(torch.tensor(nll_e[i] / n_pred).exp())
        metrics.append(TextMetrics(
            n_tokens=int(tokens), kl=round(kl[i] / tokens, 8), kl_max_token=round(kl_max[i], 6),
            kl_outside_groups=round(kl_out[i] / max(n_out, 1.0), 8) if groups else None,
            ppl_target=round(ppl_t, 5), ppl_edited=round(ppl_e, 5),
            ppl_change_pct=round(100 * (ppl_e / ppl_t - 1), 4)))
    shifts = [{g: (gsum_t[g] / tokens, gsum_e[i][g] / tokens) for g in groups} for i in range(n)]
    return metrics, shifts


@torch.no_grad()
def probe_rows(session: RunSession, edit: Edit, probes: Sequence[Probe],
               batch_size: int = 64) -> list[ProbeRow]:
    rows: list[ProbeRow] = []
    for i in range(0, len(probes), batch_size):
        chunk = probes[i : i + batch_size]
        b = prompt_batch(session, [p.prompt for p in chunk])
        r = torch.arange(len(chunk), device=session.device)
        tgt = _logprobs(session, None, b.ids)[r, b.last]
        ed = _logprobs(session, edit, b.ids)[r, b.last]
        exp = torch.tensor([session.token_id(p.expected) for p in chunk], device=session.device)
        tp, ep = tgt.gather(1, exp[:, None])[:, 0].exp(), ed.gather(1, exp[:, None])[:, 0].exp()
        t1, e1 = tgt.argmax(-1).tolist(), ed.argmax(-1).tolist()
        for j, p in enumerate(chunk):
            rows.append(ProbeRow(
                prompt=p.prompt, expected=p.expected, target_prob=round(float(tp[j]), 6),
                edited_prob=round(float(ep[j]), 6), target_top1=session.token_str(t1[j]),
                edited_top1=session.token_str(e1[j])))
    return rows


def failing(rows: Sequence[ProbeRow], limit: int = MAX_FAILING) -> tuple[int, list[FailedProbe]]:
    """(number of probes whose edited top-1 misses, the first ``limit``: those the edit broke,
    then those the target already missed)."""
    bad = [r for r in rows if r.edited_top1 != r.expected]
    bad.sort(key=lambda r: r.target_top1 != r.expected)  # stable: edit-broken first
    return len(bad), [FailedProbe(
        prompt_tail=("… " if len(r.prompt.split()) > TAIL_WORDS else "")
        + " ".join(r.prompt.split()[-TAIL_WORDS:]),
        expected=r.expected, got=r.edited_top1, prob=round(r.edited_prob, 4),
        target_got=r.target_top1) for r in bad[:limit]]


def summarise(rows: Sequence[ProbeRow], *, list_failing: bool = True) -> ProbeSummary | None:
    if not rows:
        return None
    n = len(rows)
    tp = sum(r.target_prob for r in rows) / n
    ep = sum(r.edited_prob for r in rows) / n
    n_bad, bad = failing(rows, MAX_FAILING if list_failing else 0)
    return ProbeSummary(
        n=n, target_prob=round(tp, 6), edited_prob=round(ep, 6),
        drop_pct=round(100 * (1 - ep / tp), 3) if tp > 0 else 0.0,
        target_accuracy=round(sum(r.target_top1 == r.expected for r in rows) / n, 4),
        edited_accuracy=round(sum(r.edited_top1 == r.expected for r in rows) / n, 4),
        n_failing=n_bad, failing=bad)


def behaviour_probes(session: RunSession, n: int, seed: int = PROBE_SEED) -> dict[str, list[Probe]]:
    """Planted-behaviour probes from a held-out seed; {} for runs without planted behaviours."""
    return {name: [Probe(prompt=p.prompt, expected=p.expected) for p in b.probes(seed, n)]
            for name, b in session.behaviours().items()}


def greedy(session: RunSession, edit: Edit | None, prompt: str, n: int) -> str:
    """The greedy continuation of ``prompt`` (target, or with ``edit``), as text."""
    return session.join_tokens(generate(session, session.encode(prompt), max_new_tokens=n,
                                        forward=edited_forward(session, edit)).generated)


# ------------------------------------------------------------------------------ control
@torch.no_grad()
def alive_components(session: RunSession, batches: Sequence[Batch]) -> dict[str, Tensor]:
    """Canonical layer → bool (C,): components with CI > 0 somewhere in the batches."""
    alive: dict[str, Tensor] = {}
    for b in batches:
        _, ci = session.cm.ci_for(b.ids)
        for m, g in ci.lower.items():
            hit = ((g > 0) & b.mask[..., None]).any(0).any(0)
            c = session.to_canonical[m]
            alive[c] = alive[c] | hit if c in alive else hit
    return alive


def random_like(session: RunSession, components: Sequence[str], alive: dict[str, Tensor],
                seed: int) -> list[str]:
    """Random components, as many per layer as ``components`` has, alive on the measured text,
    none of them in ``components``."""
    rng = random.Random(seed)
    chosen = set(components)
    out: list[str] = []
    for key in components:
        layer = layer_of(key)
        pool = [str(ComponentKey(layer, c)) for c in alive[layer].nonzero()[:, 0].tolist()]
        pool = [k for k in pool if k not in chosen] or [
            k for k in (str(ComponentKey(layer, c)) for c in range(session.keys.Cs[layer]))
            if k not in chosen]
        pick = rng.choice(pool)
        chosen.add(pick)
        out.append(pick)
    return out


def scaled_control(edit: Edit, randoms: Sequence[str]) -> Edit:
    """The same scales (and thresholds) moved onto other components."""
    return Edit(scales=[ScaledComponent(ComponentKey.parse(r), s.scale, s.ci_threshold)
                        for s, r in zip(edit.scales, randoms, strict=True)])


# ------------------------------------------------------------------------------ measure
def measure_edit(
    session: RunSession,
    edit: Edit,
    settings: MeasureSettings | None = None,
    *,
    control_edit: Callable[[list[str]], Edit] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EditMeasurement:
    """Measure ``edit`` against the target.

    ``control_edit(random_components)`` builds the control (default: the same scales on random
    components; trained edits pass a function that retrains on them).
    """
    st = settings or MeasureSettings()
    session.require_lm()
    if len(st.probes) > MAX_PROBES:
        raise AnalysisError(f"at most {MAX_PROBES} probes, got {len(st.probes)}")
    groups = _groups(session, st.token_groups)
    for p in st.generation_prompts:
        session.encode(p)
    steps = 4 + (1 if st.control else 0)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, steps)

    docs = documents(session, "heldout", st.n_texts)
    batches = document_batches(session, docs, st.batch_size)
    notes: list[str] = []
    components = edit.components()
    randoms: list[str] = []
    ctrl_edit: Edit | None = None
    if st.control:
        if not components:
            notes.append("no components in this edit (dense only or empty): no random control")
        else:
            alive = alive_components(session, batches)
            randoms = random_like(session, components, alive, st.control_seed)
            if control_edit is not None:
                ctrl_edit = control_edit(randoms)
            elif edit.adapters or edit.dense:
                notes.append("trained edit without a control recipe: no random control")
            else:
                ctrl_edit = scaled_control(edit, randoms)
        tick()
    all_edits = [edit] + ([ctrl_edit] if ctrl_edit is not None else [])
    texts, shifts = text_metrics(session, all_edits, batches, groups)
    tick()

    def group_rows(sh: dict[str, tuple[float, float]]) -> list[GroupShift]:
        return [GroupShift(group=g, tokens=st.token_groups[g], target=round(a, 6),
                           edited=round(b, 6), shift=round(b - a, 6)) for g, (a, b) in sh.items()]

    rows = probe_rows(session, edit, st.probes) if st.probes else []
    summary = summarise(rows)
    tick()
    behaviours: list[BehaviourAccuracy] = []
    if st.behaviours:
        for name, probes in behaviour_probes(session, st.n_behaviour_probes).items():
            s = summarise(probe_rows(session, edit, probes))
            assert s is not None
            behaviours.append(BehaviourAccuracy(behaviour=name, n=s.n, target=s.target_accuracy,
                                                edited=s.edited_accuracy, n_failing=s.n_failing,
                                                failing=s.failing))
    tick()
    gens = [GenerationPair(prompt=p, target=greedy(session, None, p, st.max_new_tokens),
                           edited=greedy(session, edit, p, st.max_new_tokens))
            for p in st.generation_prompts]
    tick()
    concentration = None
    control: ControlResult | None = None
    if ctrl_edit is not None:
        control = ControlResult(
            components=randoms, text=texts[1], token_groups=group_rows(shifts[1]),
            probes=(summarise(probe_rows(session, ctrl_edit, st.probes), list_failing=False)
                    if st.probes else None),
            note=("random components alive on the measured text, as many per layer as the "
                  "edit, same edit recipe"))
        concentration = {"kl_ratio": round(texts[0].kl / max(texts[1].kl, 1e-12), 4)}
        if summary is not None and control.probes is not None:
            concentration["probe_drop_ratio"] = round(
                summary.drop_pct / max(abs(control.probes.drop_pct), 1e-3), 4)
    return EditMeasurement(
        components=components, text=texts[0], token_groups=group_rows(shifts[0]),
        probes=summary, probe_rows=rows[:50], behaviours=behaviours, generations=gens,
        control=control, concentration=concentration, notes=notes)


def screen_components(
    session: RunSession, keys: Sequence[str], *, scale: float = 0.0,
    ci_threshold: float | None = 0.0, n_texts: int = 64, batch_size: int = 16,
) -> list[tuple[str, float]]:
    """Collateral of each component alone: KL(target ‖ edited) per token on the *training*
    stream when only that component is scaled. Use it to drop candidates that change text
    everywhere before building an edit (measure the edit itself on held-out text)."""
    edits = [scale_edit(session, [ComponentScale(component=k, scale=scale,
                                                 ci_threshold=ci_threshold)]) for k in keys]
    docs = documents(session, "train", n_texts)
    batches = document_batches(session, docs, batch_size)
    metrics, _ = text_metrics(session, edits, batches, {})
    return [(str(e.scales[0].key), m.kl) for e, m in zip(edits, metrics, strict=True)]
