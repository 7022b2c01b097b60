"""Tests for the zoo transformer, its topology, and (slow) the trained `tales` target."""

from __future__ import annotations

import pytest
import torch

from spd_mcp.model.topology import Topology
from spd_mcp.model.zoo.transformer import Transformer, TransformerConfig

DECOMPOSABLE_2L = (
    "0.attn.q", "0.attn.k", "0.attn.v", "0.attn.o", "0.mlp.up", "0.mlp.down",
    "1.attn.q", "1.attn.k", "1.attn.v", "1.attn.o", "1.mlp.up", "1.mlp.down",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest (and steadiest on a shared CPU) on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _model(seed: int = 0, **kwargs: object) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(vocab_size=50, **kwargs)).eval()


def test_config_defaults_and_validation() -> None:
    config = TransformerConfig(vocab_size=10)
    assert (config.d_model, config.n_layers, config.n_heads, config.max_len) == (64, 2, 4, 128)
    assert config.mlp_width == 256 and config.d_head == 16 and not config.tie_embeddings
    assert TransformerConfig(vocab_size=10, d_mlp=32).mlp_width == 32
    with pytest.raises(ValueError):
        TransformerConfig(vocab_size=10, d_model=60, n_heads=8)


def test_output_shape() -> None:
    ids = torch.randint(0, 50, (3, 17))  # (B, T)
    assert _model()(ids).shape == (3, 17, 50)


def test_causality() -> None:
    model = _model()
    ids = torch.randint(0, 50, (2, 20))  # (B, T)
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 50
    with torch.no_grad():
        a, b = model(ids), model(changed)  # (B, T, V)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_padding_on_the_right_does_not_change_real_positions() -> None:
    model = _model()
    ids = torch.randint(4, 50, (1, 9))  # (1, T)
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)  # (1, T + 5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(padded)[:, :9])


def test_deterministic_init() -> None:
    a, b, c = _model(1), _model(1), _model(2)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.blocks[0].attn.q.weight, c.blocks[0].attn.q.weight)


def test_too_long_input_rejected() -> None:
    with pytest.raises(ValueError, match="max_len"):
        _model(max_len=8)(torch.zeros(1, 9, dtype=torch.long))


def test_module_paths_and_topology() -> None:
    config = TransformerConfig(vocab_size=50)
    model = Transformer(config)
    topology = Topology.for_transformer(config)
    assert topology.decomposable() == DECOMPOSABLE_2L
    assert topology.canonical_names == ("embed", *DECOMPOSABLE_2L, "output")
    modules = dict(model.named_modules())
    for name in topology.canonical_names:
        path = topology.to_module(name)
        assert path in modules
        assert topology.to_canonical(path) == name
    assert topology.to_module("1.mlp.down") == "blocks.1.mlp.down"
    assert topology.to_module("output") == "unembed"
    assert isinstance(modules["blocks.0.attn.q"], torch.nn.Linear)
    assert modules["blocks.0.attn.q"].bias is None


def test_topology_errors_name_valid_choices() -> None:
    topology = Topology.for_transformer(TransformerConfig(vocab_size=50))
    with pytest.raises(ValueError, match=r"'2\.attn\.q'.*0\.attn\.q"):
        topology.to_module("2.attn.q")
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn'.*blocks\.0\.attn\.q"):
        topology.to_canonical("blocks.0.attn")


def test_attention_only_model() -> None:
    config = TransformerConfig(vocab_size=50, mlp=False)
    model = Transformer(config)
    modules = dict(model.named_modules())
    assert not any(".mlp" in path for path in modules)
    topology = Topology.for_transformer(config)
    assert topology.decomposable() == tuple(n for n in DECOMPOSABLE_2L if "mlp" not in n)
    assert all(topology.to_module(n) in modules for n in topology.canonical_names)
    assert model(torch.randint(0, 50, (2, 5))).shape == (2, 5, 50)


def test_identity_topology() -> None:
    topology = Topology.identity(["b", "a", "c"], decomposable=["c", "b"])
    assert topology.canonical_names == ("b", "a", "c")
    assert topology.decomposable() == ("b", "c")
    assert topology.to_module("a") == "a" and topology.to_canonical("c") == "c"
    assert Topology.identity(["x", "y"]).decomposable() == ("x", "y")
    with pytest.raises(ValueError, match="z"):
        Topology.identity(["x"], decomposable=["z"])


def test_tied_embeddings() -> None:
    model = Transformer(TransformerConfig(vocab_size=50, tie_embeddings=True))
    assert model.unembed.weight is model.embed.weight


@pytest.mark.slow
def test_tales_target_learns_every_behaviour() -> None:
    from spd_mcp.model.zoo.tales.train import evaluate_behaviours, train_tales_target

    result = train_tales_target(seed=0)
    scores = evaluate_behaviours(result.model, result.tokenizer, seed=12345, n=200)
    assert all(acc >= 0.98 for acc in scores.values()), scores
