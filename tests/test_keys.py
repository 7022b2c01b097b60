"""The key grammar: parsing, formatting and errors that name the problem."""

import pytest

from spd_mcp.keys import BadKeyError, ComponentKey, KeySpace, NodeKey

KS = KeySpace({"0.attn.q": 8, "0.mlp.up": 16}, vocab_size=100)


def test_round_trip() -> None:
    assert KS.component("0.mlp.up:15") == ComponentKey("0.mlp.up", 15)
    assert str(KS.component("0.attn.q:3")) == "0.attn.q:3"
    assert KS.node("0.attn.q:4:7", n_pos=5) == NodeKey("0.attn.q", 4, 7)
    assert str(KS.node("output:2:99", n_pos=3)) == "output:2:99"
    assert KS.node("embed:0:0", n_pos=1).layer == "embed"


@pytest.mark.parametrize(
    ("key", "n_pos", "needle"),
    [
        ("9.attn.q:1", None, "unknown layer '9.attn.q'; valid layers: 0.attn.q, 0.mlp.up"),
        ("0.attn.q:8", None, "out of range for 0.attn.q (C=8: 0..7)"),
        ("0.attn.q:-1", None, "negative"),
        ("0.attn.q:x", None, "not an integer"),
        ("0.attn.q", None, "must look like 'LAYER:C'"),
        ("0.attn.q:5:1", 5, "position 5 out of range (prompt has 5 tokens: 0..4)"),
        ("0.mlp.up:0:16", 3, "C=16"),
        ("output:0:100", 3, "token id 100 out of range (vocab 100)"),
        ("embed:0:1", 3, "embed nodes have index 0"),
        ("0.attn.q:1", 3, "must look like 'LAYER:POS:C'"),
    ],
)
def test_errors_name_the_problem(key: str, n_pos: int | None, needle: str) -> None:
    with pytest.raises(BadKeyError) as info:
        KS.component(key) if n_pos is None else KS.node(key, n_pos)
    assert needle in str(info.value)
    assert repr(key) in str(info.value) or "unknown layer" in str(info.value)


def test_special_nodes_refused_where_components_expected() -> None:
    with pytest.raises(BadKeyError, match="unknown layer 'embed'"):
        KS.node("embed:0:0", n_pos=2, allow_special=False)
