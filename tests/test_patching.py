"""Activation patching on `tales`: exactness (nothing / everything / one layer against the
routed forward), sweep rows equal single runs, the agreement head noun carries the verb's number
(held-out probes), and the MCP tool answers good and bad calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from mcp import Client

from spd_mcp.analysis.patching import Patcher, PatchSpec, patchable_layers, run_patching
from spd_mcp.errors import AnalysisError
from spd_mcp.keys import NodeKey
from spd_mcp.model.session import RunSession
from spd_mcp.model.zoo.tales.corpus import ANIMALS, BEHAVIOURS, PREPOSITIONS, SCENERY
from tests.test_server import with_client

NUMBER = {**ANIMALS, **SCENERY}
NUMBER |= {plural: single for single, plural in list(NUMBER.items())}


@pytest.fixture(scope="module")
def session() -> RunSession:
    return RunSession.load("tales")


def _pair(s: RunSession, prompt: str) -> tuple[str, str, int]:
    """(prompt, the prompt with its agreement head noun's number flipped, head position)."""
    words = prompt.split()
    i = max(j for j, w in enumerate(words) if w in PREPOSITIONS) - 1
    flipped = [*words[:i], NUMBER[words[i]], *words[i + 1:]]
    assert s.tokens(s.encode(prompt))[i + 1] == words[i]  # +1: BOS
    return prompt, " ".join(flipped), i + 1


def _everything(s: RunSession, T: int) -> PatchSpec:
    nodes = tuple(NodeKey(layer, p, c) for layer in s.layers for p in range(T)
                  for c in range(s.keys.Cs[layer]))
    return PatchSpec(nodes=nodes, outputs=tuple((layer, p) for layer in patchable_layers(s)
                                                for p in range(T)))


@pytest.fixture(scope="module")
def pair(session: RunSession) -> tuple[list[int], list[int], int]:
    probe = BEHAVIOURS["agreement"].probes(seed=3, n=1)[0]
    clean, corrupt, head = _pair(session, probe.prompt)
    return session.encode(clean), session.encode(corrupt), head


def test_patching_nothing_and_everything_is_exact(session: RunSession, pair: Any) -> None:
    clean, corrupt, _ = pair
    T = len(clean)
    pairs = [(i, i) for i in range(T)]
    for direction, run, other in (("noising", clean, corrupt), ("denoising", corrupt, clean)):
        p = Patcher(session, clean, corrupt, pairs, direction)
        run_logits = session.natural_ci(run).logits[-1]
        other_logits = session.natural_ci(other).logits[-1]
        assert (run_logits - other_logits).abs().max() > 1.0  # the prompts differ
        rows = p.run([PatchSpec(), _everything(session, T),
                      PatchSpec(outputs=tuple(("embed", q) for q in range(T)))])
        assert torch.allclose(rows[0], run_logits, atol=1e-5, rtol=0)
        assert torch.allclose(rows[1], other_logits, atol=1e-5, rtol=0)
        assert torch.allclose(rows[2], other_logits, atol=1e-5, rtol=0)  # embeddings suffice


def test_layer_patches_match_independent_forwards(session: RunSession, pair: Any) -> None:
    clean, corrupt, head = pair
    T, cm = len(clean), session.cm
    p = Patcher(session, clean, corrupt, [(i, i) for i in range(T)], "noising")
    nat = session.natural_ci(corrupt)
    layer = "1.attn.k"
    module = session.to_module[layer]
    # every component of one layer everywhere == the routed forward with the corrupt acts
    # overriding that layer (the run's own delta term kept)
    spec = PatchSpec(nodes=tuple(NodeKey(layer, q, c) for q in range(T)
                                 for c in range(session.keys.Cs[layer])))
    routed = cm(session.ids_tensor(clean), masks={module: torch.ones(1, T, 128)},
                delta_masks={module: 1.0}, acts_override={module: nat.acts[layer][None]})
    # the whole layer at the head position == its output replaced there by a plain hook
    outs: dict[str, torch.Tensor] = {}
    mod = cm.target.get_submodule(module)
    h = mod.register_forward_hook(lambda _m, _a, o: outs.setdefault("k", o))
    cm.target(session.ids_tensor(corrupt))
    h.remove()

    def swap(_m: torch.nn.Module, _a: tuple, o: torch.Tensor) -> torch.Tensor:
        o = o.clone()
        o[:, head] = outs["k"][:, head]
        return o

    h = mod.register_forward_hook(swap)
    with torch.no_grad():
        hooked = cm.target(session.ids_tensor(clean))[0, -1]
    h.remove()
    rows = p.run([spec, PatchSpec(outputs=((layer, head),))])
    assert torch.allclose(rows[0], routed[0, -1], atol=1e-5, rtol=0)
    assert torch.allclose(rows[1], hooked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["nodes", "components", "layers"])
def test_sweep_rows_equal_single_patch_runs(session: RunSession, pair: Any, mode: str) -> None:
    clean, corrupt, _ = pair
    is_, are = session.token_id("is"), session.token_id("are")
    r = run_patching(session, clean, corrupt, is_, contrast=are, direction="noising",
                     sweep=mode, top=4)  # type: ignore[arg-type]
    assert r.sweep is not None and r.sweep.n_variants > 4 and len(r.sweep.ranked) == 4
    changes = [abs(x.change) for x in r.sweep.ranked]
    assert changes == sorted(changes, reverse=True)
    for row in r.sweep.ranked[:3]:
        parts = row.patch.split(":")
        if parts[-1] == "*" or parts[0] == "embed":
            spec = PatchSpec(outputs=((parts[0], int(parts[1])),))
        elif len(parts) == 3:
            spec = PatchSpec(nodes=(NodeKey(parts[0], int(parts[1]), int(parts[2])),))
        else:
            spec = PatchSpec(nodes=tuple(NodeKey(parts[0], q, int(parts[1]))
                                         for q in range(len(clean))))
        one = run_patching(session, clean, corrupt, is_, contrast=are, spec=spec,
                           direction="noising")
        assert one.patched is not None
        assert one.patched.metrics.logit_diff == pytest.approx(row.value, abs=2e-5)
        assert one.patched.fraction_recovered == pytest.approx(row.fraction_recovered, abs=1e-4)


def test_agreement_head_noun_carries_the_verb_number(session: RunSession) -> None:
    """Held-out probes: flip the head noun's number. Patching its position's component
    activations (all C of every layer, no delta) moves (is - are) all the way: measured
    0.998-1.001 of the gap on 12 probes, both directions; the k/v layers at that position carry
    everything on to the verb (exactly 1). The sweeps rank the head position at the top."""
    is_, are = session.token_id("is"), session.token_id("are")
    fractions = []
    for probe in BEHAVIOURS["agreement"].probes(seed=11, n=4):
        clean_text, corrupt_text, head = _pair(session, probe.prompt)
        clean, corrupt = session.encode(clean_text), session.encode(corrupt_text)
        T = len(clean)
        comps = PatchSpec(nodes=tuple(NodeKey(layer, head, c) for layer in session.layers
                                      for c in range(session.keys.Cs[layer])))
        kv = PatchSpec(outputs=tuple((f"{b}.attn.{m}", head) for b in (0, 1) for m in "kv"))
        for direction in ("noising", "denoising"):
            r = run_patching(session, clean, corrupt, is_, contrast=are, spec=comps,
                             direction=direction, sweep="layers", top=6)  # type: ignore[arg-type]
            assert r.patched is not None and r.patched.fraction_recovered is not None
            assert r.clean.logit_diff is not None and r.corrupt.logit_diff is not None
            sign = 1 if probe.expected == "is" else -1
            assert sign * r.clean.logit_diff > 3 and sign * r.corrupt.logit_diff < -3
            fractions.append(r.patched.fraction_recovered)
            rkv = run_patching(session, clean, corrupt, is_, contrast=are, spec=kv,
                               direction=direction)  # type: ignore[arg-type]
            assert rkv.patched is not None
            assert rkv.patched.fraction_recovered == pytest.approx(1.0, abs=2e-3)
            # layers sweep: the strongest rows sit at the head noun or at the verb's position
            assert r.sweep is not None
            pos = [int(x.patch.split(":")[1]) for x in r.sweep.ranked]
            assert set(pos[:4]) <= {head, T - 1} and pos.count(head) >= 2
            assert f"embed:{head}:0" in [x.patch for x in r.sweep.ranked[:5]]
            between = [x for x in r.sweep.ranked if head < int(x.patch.split(":")[1]) < T - 1]
            assert all(abs(x.fraction_recovered or 0) < 0.1 for x in between)
        # nodes sweep (noising): the strongest head-position node is a layer-1 key component
        rn = run_patching(session, clean, corrupt, is_, contrast=are, direction="noising",
                          sweep="nodes", top=200)
        assert rn.sweep is not None
        at_head = [x for x in rn.sweep.ranked if int(x.patch.split(":")[1]) == head]
        assert at_head[0].patch.startswith("1.attn.k:")  # (0.03-0.84 of the gap alone)
    assert min(fractions) > 0.98 and max(fractions) < 1.02, fractions


def test_position_map_and_analysis_errors(session: RunSession) -> None:
    is_ = session.token_id("is")
    clean = session.encode("the dog near the old trees")
    corrupt = session.encode("the dogs near the trees")
    with pytest.raises(AnalysisError, match="aligned patching needs equal lengths"):
        run_patching(session, clean, corrupt, is_, sweep="layers")
    pmap = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 6: 5}  # skip 'old'; last -> last
    r = run_patching(session, clean, corrupt, is_, position_map=pmap, direction="noising",
                     spec=PatchSpec(outputs=(("embed", 2),)), sweep="layers")
    assert r.patched is not None and r.position_map == pmap
    assert r.patched.fraction_recovered is not None and r.patched.fraction_recovered > 0.5
    assert r.sweep is not None and all(int(x.patch.split(":")[1]) in pmap for x in r.sweep.ranked)
    with pytest.raises(AnalysisError, match="out of range"):
        run_patching(session, clean, corrupt, is_, position_map={7: 5}, sweep="layers")
    with pytest.raises(AnalysisError, match=r"clean positions \[5\] are not in position_map"):
        run_patching(session, clean, corrupt, is_, position_map=pmap,
                     spec=PatchSpec(outputs=(("embed", 5),)))
    with pytest.raises(AnalysisError, match="nothing to patch"):
        run_patching(session, clean, clean, is_)


PAIR = ("the dog near the old trees", "the dogs near the old trees")
BAD_CALLS: list[tuple[dict[str, Any], str]] = [
    ({"clean": PAIR[0], "corrupt": PAIR[1], "label_token": "is"}, "nothing to patch"),
    ({"clean": PAIR[0], "corrupt": "the dogs near the trees", "label_token": "is",
      "sweep": "layers"}, "give position_map"),
    ({"clean": PAIR[0], "corrupt": PAIR[1], "label_token": "is", "position_map": {"9": 0},
      "sweep": "layers"}, "position_map: clean position 9 out of range"),
    ({"clean": PAIR[0], "corrupt": PAIR[1], "label_token": "is", "position_map": {"1": 0,
      "2": 0}, "sweep": "layers"}, "position_map must be one-to-one"),
    ({"clean": PAIR[0], "corrupt": PAIR[1], "label_token": "is", "position_map": {"2": 2},
      "nodes": ["0.attn.q:3:1"]}, "nodes: '0.attn.q:3:1': clean position 3 is not in"),
    ({"clean": PAIR[0], "corrupt": PAIR[1], "label_token": "is",
      "layers_at_positions": [{"layer": "2.attn.v", "positions": [1]}]},
     "layers_at_positions[0].layer: unknown layer '2.attn.v'; valid: embed, 0.attn.q"),
    ({"clean": PAIR[0], "corrupt": PAIR[1], "label_token": "is",
      "layers_at_positions": [{"layer": "0.attn.v", "positions": [12]}]},
     "layers_at_positions[0].positions 12 out of range"),
    ({"clean": PAIR[0], "corrupt": PAIR[1], "label_token": "is",
      "layers_at_positions": [{"layer": "0.attn.v", "pos": [1]}]}, "pos"),
    ({"clean": PAIR[0], "corrupt": PAIR[1], "label_token": "is", "nodes": ["output:2:5"]},
     "is an output node"),
    ({"clean": PAIR[0], "corrupt": PAIR[1], "label_token": "is", "nodes": ["0.attn.q:2:128"]},
     "nodes: '0.attn.q:2:128': component index 128 out of range"),
    ({"clean": PAIR[0], "corrupt": PAIR[1], "label_token": "is", "components": ["0.attn.q"]},
     "components: component key '0.attn.q' must look like 'LAYER:C'"),
    ({"clean": PAIR[0], "corrupt": PAIR[1], "label_token": "qqq", "sweep": "nodes"},
     "label_token: token 'qqq' is not in the vocabulary"),
    ({"clean": PAIR[0], "corrupt": PAIR[1], "label_token": "is", "contrast_token": "is",
      "sweep": "nodes"}, "contrast_token equals label_token"),
    ({"clean": PAIR[0], "corrupt": "the dogs qqq", "label_token": "is", "sweep": "nodes"},
     "corrupt: words not in the vocabulary: ['qqq']"),
    ({"corrupt": PAIR[1], "label_token": "is", "sweep": "nodes"},
     "give exactly one of clean or clean_prompt_id"),
    ({"clean": PAIR[0], "corrupt_prompt_id": 999, "label_token": "is", "sweep": "nodes"},
     "corrupt_prompt_id: prompt_id 999 does not exist"),
    ({"clean": PAIR[0], "corrupt": PAIR[1], "label_token": "is", "sweep": "heads"}, "sweep"),
    ({"clean": PAIR[0], "corrupt": PAIR[1], "label_token": "is", "direction": "up"},
     "direction"),
]


def test_tool_through_the_server(session: RunSession, tmp_path: Path) -> None:
    good = {"clean": PAIR[0], "corrupt": PAIR[1], "label_token": "is", "contrast_token": "are",
            "direction": "noising", "nodes": ["embed:2:0"], "sweep": "layers", "top": 5}

    async def fn(c: Client) -> None:
        r1 = await c.call_tool("run_patching", good)
        assert not r1.is_error, r1.content
        out = r1.structured_content
        assert out is not None and not out["cached"] and out["run_prompt"] == "clean"
        assert out["patched"]["fraction_recovered"] == pytest.approx(1.0, abs=1e-3)
        assert len(out["sweep"]["ranked"]) == 5 and out["metric"] == "logit_diff"
        r2 = await c.call_tool("run_patching", good)
        assert r2.structured_content is not None and r2.structured_content["cached"]
        assert r2.structured_content["run_id"] == out["run_id"]
        for args, needle in BAD_CALLS:
            res = await c.call_tool("run_patching", args)
            text = " ".join(getattr(b, "text", "") for b in res.content)
            assert res.is_error, (args, text)
            assert needle in text, (args, text)
            assert not (await c.call_tool("get_model_info", {})).is_error

    with_client(session, tmp_path / "app.db", fn)
