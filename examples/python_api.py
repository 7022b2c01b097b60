"""The Python API on the shipped `tales` run: find the circuit behind a planted pronoun, test it,
and edit the model — the same analyses the MCP tools run. Self-checking: it asserts what it
prints and exits non-zero when a claim fails.

    python examples/python_api.py
"""

from __future__ import annotations

import torch

import spd_mcp

PROMPT = ("once upon a time , a kind girl named mia lived in a cottage . mia had a friend called "
          "tom . tom walked to the park , and there")


def main() -> None:
    run = spd_mcp.load_run("tales")
    print(f"{len(run.layers)} decomposed layers: {', '.join(run.layers)}")
    assert len(run.layers) == 12, run.layers

    nxt = run.generate(PROMPT, max_new_tokens=1).generated
    print(f"the target continues with {nxt}")
    assert nxt == ["he"], nxt  # the planted pronoun rule: tom → he

    circuit, graph = run.optimize(PROMPT, label="he", steps=200)
    nodes = circuit.nodes()
    probs = circuit.result.metrics.label_prob
    print(f"sparse circuit: {len(nodes)} nodes; P(he) "
          + ", ".join(f"{k} {v:.3f}" for k, v in probs.items()))
    assert 0 < len(nodes) < 100, len(nodes)
    assert probs["ci"] > 0.5, probs  # the circuit alone keeps the prediction

    res = run.intervene(PROMPT, nodes, label="he", loss="label")
    assert res.label_prob is not None
    print("the circuit under each regime: "
          + ", ".join(f"{k} {v:.3f}" for k, v in res.label_prob.items()))
    # Keeping only the circuit keeps P(he); switching the circuit off in the full model drops it.
    assert res.label_prob["ci"] > 0.5, res.label_prob
    assert res.label_prob["ablated"] < res.label_prob["target"], res.label_prob

    components = sorted({str(k.component) for k in
                         run.session.keys.nodes(nodes, len(run.session.encode(PROMPT)))})
    abl = run.ablate(PROMPT, components, label="he")
    assert abl.label_prob is not None
    print(f"ablating its {len(components)} components at every position: P(he) "
          f"{abl.label_prob['target']:.3f} → {abl.label_prob['ablated']:.3f}")
    assert abl.label_prob["ablated"] < abl.label_prob["target"], abl.label_prob

    edit = run.edit(dict.fromkeys(components, 0.0))  # the same ablation as a stored-able edit
    gen = run.generate(PROMPT, max_new_tokens=1, edit=edit)
    print(f"the edited model continues with {gen.generated} (p={gen.token_probs[0]:.3f})")
    s = run.session
    with torch.no_grad(), run.applied(edit):
        logits = s.cm.target(s.ids_tensor(s.encode(PROMPT)))[0, -1]
    p_he = float(logits.softmax(-1)[s.token_id("he")])
    assert abs(p_he - abl.label_prob["ablated"]) < 1e-4, p_he  # the edit is the ablation
    if p_he > 0.5:  # sufficient is not necessary: other components also say "he"
        print("the circuit suffices for 'he' but is not its only route (redundancy)")
    assert graph.n_nodes > 0 and graph.n_edges > 0
    print("ok")


if __name__ == "__main__":
    main()
