"""The Python API gives the same answers as the analyses behind the tools."""

import spd_mcp


def test_api_round_trip() -> None:
    run = spd_mcp.load_run("tales")
    text = "mia found a ball in the park . the ball was"
    assert run.tokens(text)[0] == "<bos>"
    assert run.generate(text, max_new_tokens=1).generated == ["red"]
    ci = run.ci(text, top_per_position=3)
    key = ci.positions[-1].top[0].key
    probe = run.probe(key, text)
    assert probe.positions[-1].ci == ci.positions[-1].top[0].ci
    nodes = [f"{a.key.rsplit(':', 1)[0]}:{p.pos}:{a.key.rsplit(':', 1)[1]}"
             for p in ci.positions for a in p.top]
    res = run.intervene(text, nodes, regimes=["ablated"], label="red")
    assert res.label_prob is not None and res.label_prob["target"] > 0.5
    assert run.search("the ball was", limit=1).total_matches > 0
    g = run.graph(text, label="red")
    assert g.n_nodes > 0 and g.n_edges > 0
