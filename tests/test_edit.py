"""Editing invariants on the shipped tales run: empty edits, scaling vs masked forwards, CI gates,
baking + standalone export, adapter initialisation and confinement, serialisation, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spd_mcp.editing.bake import (
    baked_target_state,
    export_baked,
    load_edited_target,
    weight_changes,
)
from spd_mcp.editing.edit import (
    ComponentScale,
    Edit,
    applied,
    edited_logits,
    scale_edit,
)
from spd_mcp.editing.measure import MeasureSettings, measure_edit
from spd_mcp.editing.train import (
    EditTarget,
    TrainSettings,
    build_trainable,
    rank_for_change,
    train_edit,
)
from spd_mcp.keys import BadKeyError
from spd_mcp.model.session import AnalysisError, RunSession

TEXT = ("once upon a time , a kind girl named mia lived in a cottage . mia found a ball . "
        "the ball was red . mia walked to the park , and there")
KEYS = ["1.mlp.down:3", "0.attn.v:10", "1.attn.o:5", "0.mlp.up:40"]


@pytest.fixture(scope="module")
def session() -> RunSession:
    return RunSession.load("tales")


@pytest.fixture(scope="module")
def x(session: RunSession) -> torch.Tensor:
    return session.ids_tensor(session.encode(TEXT))


def masked_logits(session: RunSession, x: torch.Tensor, scales: dict[str, float],
                  gate: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The same edit through ComponentModel masks (all 1, delta on, edited components scaled)."""
    T = x.shape[1]
    masks = {m: torch.ones(1, T, C) for m, C in session.cm.Cs.items()}
    for k, s in scales.items():
        layer, c = k.rsplit(":", 1)
        m = session.to_module[layer]
        if gate is None:
            masks[m][..., int(c)] = s
        else:
            g = gate[m][..., int(c)]
            masks[m][..., int(c)] = torch.where(g, torch.tensor(s), torch.tensor(1.0))
    return session.cm(x, masks=masks, delta_masks={m: 1.0 for m in masks})


@torch.no_grad()
def test_empty_edit_is_the_target_exactly(session: RunSession, x: torch.Tensor) -> None:
    assert torch.equal(edited_logits(session, Edit(), x), session.cm.target(x))
    m = measure_edit(session, Edit(), MeasureSettings(n_texts=16, control=False,
                                                      behaviours=False))
    assert m.text.kl <= 1e-6
    assert m.text.ppl_edited == m.text.ppl_target


@torch.no_grad()
def test_scaling_equals_masked_component_forward(session: RunSession, x: torch.Tensor) -> None:
    scales = {KEYS[0]: 0.0, KEYS[1]: 0.0, KEYS[2]: 2.5, KEYS[3]: 0.5}
    edit = scale_edit(session, [ComponentScale(component=k, scale=s) for k, s in scales.items()])
    ours = edited_logits(session, edit, x)
    ref = masked_logits(session, x, scales)
    assert (ours - session.cm.target(x)).abs().max() > 1e-2  # the edit does something
    torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1), atol=1e-5, rtol=0)


@torch.no_grad()
def test_ci_gated_ablation_only_where_active(session: RunSession, x: torch.Tensor) -> None:
    _, ci = session.cm.ci_for(x)
    gate = {m: g > 0.1 for m, g in ci.lower.items()}
    # components active at some positions but not all, so the gate matters
    keys = []
    for m, g in gate.items():
        frac = g[0].float().mean(0)
        keys += [f"{session.to_canonical[m]}:{c}"
                 for c in ((frac > 0) & (frac < 0.5)).nonzero()[:, 0].tolist()[:2]]
    assert len(keys) >= 4
    scales = dict.fromkeys(keys, 0.0)
    gated = scale_edit(session, [ComponentScale(component=k, scale=0.0, ci_threshold=0.1)
                                 for k in keys])
    ours = edited_logits(session, gated, x)
    torch.testing.assert_close(ours.softmax(-1), masked_logits(session, x, scales, gate)
                               .softmax(-1), atol=1e-5, rtol=0)
    everywhere = edited_logits(session, scale_edit(session, [
        ComponentScale(component=k, scale=0.0) for k in keys]), x)
    assert (everywhere - ours).abs().max() > 1e-3
    with pytest.raises(AnalysisError, match="cannot bake a CI-gated edit"):
        baked_target_state(session, gated)
    with pytest.raises(AnalysisError, match="needs the input"), applied(session, gated):
        pass


@torch.no_grad()
def test_baked_export_reproduces_runtime_ablation(session: RunSession, x: torch.Tensor,
                                                  tmp_path: Path) -> None:
    edit = scale_edit(session, [ComponentScale(component=k, scale=0.0) for k in KEYS])
    runtime = edited_logits(session, edit, x)
    out = export_baked(session, edit, tmp_path / "edited")
    assert sorted(p.name for p in out.iterdir()) == [
        "edited_target.json", "target.safetensors", "tokenizer.json"]
    standalone = load_edited_target(out)
    assert not hasattr(standalone, "components")  # a plain target module, no SPD
    baked = standalone(x)
    torch.testing.assert_close(baked.softmax(-1), runtime.softmax(-1), atol=1e-5, rtol=0)
    assert (baked - runtime).abs().max() < 1e-4
    # only the edited layers' weights changed
    state = baked_target_state(session, edit)
    edited = {f"{session.to_module[k.rsplit(':', 1)[0]]}.weight" for k in KEYS}
    for name, w in session.cm.target.state_dict().items():
        assert torch.equal(state[name], w) == (name not in edited), name
    with pytest.raises(AnalysisError, match="already exists"):
        export_baked(session, edit, out)


@torch.no_grad()
def test_adapter_starts_at_the_exact_target(session: RunSession, x: torch.Tensor) -> None:
    for mode in ("components", "full_matrix"):
        edit, leaves, _ = build_trainable(session, KEYS, TrainSettings(mode=mode))
        assert leaves and all(t.requires_grad for t in leaves)
        assert torch.equal(edited_logits(session, edit, x), session.cm.target(x)), mode


def test_adapter_training_is_confined_and_reversible(session: RunSession,
                                                     x: torch.Tensor) -> None:
    before = {k: v.clone() for k, v in session.cm.state_dict().items()}
    target = session.cm.target(x).detach()
    prompt = "mia found a ball . the ball was"
    edit, report = train_edit(
        session, KEYS[:2], [EditTarget(prompt=prompt, token="blue")],
        TrainSettings(vectors="write", steps=15, lr=0.05, n_kl_texts=8, kl_batch_size=8))
    assert report.targets[0].after > report.targets[0].before
    assert report.n_trainable == 2 * 64  # two write vectors of d_out = d_model
    # write-only: the read vectors are the originals
    for layer, a in edit.adapters.items():
        comp = session.cm.component(session.to_module[layer])
        assert torch.equal(a.V, comp.V.detach()[:, a.index])
        assert not torch.equal(a.U, comp.U.detach()[a.index])
    # the run itself is untouched; not applying the edit is the target
    for k, v in session.cm.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(session.cm.target(x), target)
    # baked change = Σ (v u' − v u)ᵀ, rank ≤ number of adapted components per layer
    state = baked_target_state(session, edit)
    changes = weight_changes(session, edit)
    assert set(changes) == {session.to_module[layer] for layer in edit.adapters}
    for layer, a in edit.adapters.items():
        m = session.to_module[layer]
        w = session.cm.target_weight(m).detach()
        assert torch.equal(state[f"{m}.weight"], w + changes[m])
        sv = torch.linalg.svdvals(changes[m].double())
        assert (sv > 1e-5 * sv[0]).sum() <= len(a.index)
    # serialisation round trip applies identically
    again = Edit.from_record(edit.describe(), edit.tensors_bytes())
    assert torch.equal(edited_logits(session, again, x), edited_logits(session, edit, x))


def test_rank_for_change_finds_colour_writers(session: RunSession) -> None:
    prompts = ["mia found a ball . the ball was", "tom had a ball , and the ball was"]
    ranked = rank_for_change(session, prompts, "red", "blue", k=4)
    assert len(ranked) == 4 and ranked[0][1] >= ranked[-1][1] > 0
    # removing the top-ranked components lowers P(red) on these prompts
    edit = scale_edit(session, [ComponentScale(component=k, scale=0.0) for k, _ in ranked])
    from spd_mcp.model.text import prompt_batch

    b = prompt_batch(session, prompts)
    r = torch.arange(len(prompts))
    with torch.no_grad():
        p0 = session.cm.target(b.ids)[r, b.last].softmax(-1)[:, session.token_id("red")]
        p1 = edited_logits(session, edit, b.ids)[r, b.last].softmax(-1)[
            :, session.token_id("red")]
    assert (p1 < p0).all()


@pytest.mark.parametrize(("make", "message"), [
    (lambda s: scale_edit(s, [ComponentScale(component="9.mlp.up:0")]), "unknown layer"),
    (lambda s: scale_edit(s, [ComponentScale(component="0.mlp.up:128")]), "0..127"),
    (lambda s: scale_edit(s, [ComponentScale(component="0.mlp.up:1"),
                              ComponentScale(component="0.mlp.up:1", scale=2)]), "twice"),
    (lambda s: train_edit(s, [], [EditTarget(prompt="the ball was", token="blue")]),
     "at least one component"),
    (lambda s: train_edit(s, ["0.mlp.up:1"], []), "at least one target"),
    (lambda s: train_edit(s, ["0.mlp.up:1"], [EditTarget(prompt="the ball was",
                                                          token="zebra")]), "zebra"),
    (lambda s: train_edit(s, ["0.mlp.up:1"], [EditTarget(prompt="the qwerty was",
                                                          token="blue")]), "qwerty"),
    (lambda s: measure_edit(s, Edit(), MeasureSettings(token_groups={"g": []}, control=False)),
     "token group"),
])
def test_bad_input_names_the_problem(session: RunSession, make, message: str) -> None:
    with pytest.raises((AnalysisError, BadKeyError), match=message):
        make(session)


def test_scale_must_be_finite() -> None:
    with pytest.raises(ValueError, match="scale"):
        ComponentScale(component="0.mlp.up:1", scale=float("nan"))
