import torch

from spd_mcp.model import losses as L
from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.config import ModulePattern
from spd_mcp.model.masks import subset_routes
from tests.byo_model import Tiny


def _cm(C: int = 4):
    return ComponentModel(Tiny(), [ModulePattern(pattern=p, C=C) for p in ("embed", "up", "down")])


def test_kl_and_mse_are_zero_on_identical_outputs_and_positive_otherwise():
    a = torch.randn(3, 5, 7)
    assert L.output_divergence("kl", a, a).abs() < 1e-6
    assert L.output_divergence("mse", a, a) == 0
    b = a + torch.randn_like(a)
    assert L.output_divergence("kl", a, b) > 0
    assert torch.isclose(L.output_divergence("mse", a, b), (a - b).pow(2).sum(-1).mean())


def test_importance_minimality_matches_formula():
    g = {"a": torch.tensor([[0.0, 0.5], [1.0, 0.5]])}
    got = L.importance_minimality_loss(g, p=2.0, eps=0.0)
    assert torch.isclose(got, torch.tensor((0 + 1) / 2 + (0.25 + 0.25) / 2))
    with_beta = L.importance_minimality_loss(g, p=1.0, eps=0.0, beta=1.0)
    extra = (torch.log2(torch.tensor(2.0)) + torch.log2(torch.tensor(2.0))) / 2
    assert torch.isclose(with_beta, torch.tensor(0.5 + 0.5) + extra)


def test_faithfulness_is_zero_when_components_equal_weights():
    cm = _cm(C=8)  # C >= every weight's rank
    with torch.no_grad():
        for n in cm.layer_names:
            c = cm.component(n)
            W = cm.target_weight(n)
            Wio = W.T if c.kind == "linear" else W  # (d_in, d_out)
            U, S, Vh = torch.linalg.svd(Wio, full_matrices=False)
            k = min(c.C, S.numel())
            c.V.zero_()
            c.U.zero_()
            c.V[:, :k] = U[:, :k] * S[:k]
            c.U[:k] = Vh[:k]
    assert L.faithfulness_loss(cm) < 1e-10


def test_pgd_finds_sources_at_least_as_bad_as_random():
    cm = _cm()
    ids = torch.randint(0, 11, (8, 4))
    out, ci = cm.ci_for(ids)
    ci = {n: torch.full_like(g, 0.2) for n, g in ci.lower.items()}

    def loss_of(src, dsrc):
        masks = {n: ci[n] + (1 - ci[n]) * src[n] for n in ci}
        return L.output_divergence("kl", out, cm(ids, masks=masks))

    torch.manual_seed(0)
    rand = torch.stack([loss_of({n: torch.rand_like(g) for n, g in ci.items()}, None)
                        for _ in range(5)]).mean()
    for shared in (False, True):
        src, _ = L.pgd_sources(loss_of, ci, steps=10, step_size=0.2, init="random",
                               shared=shared, include_delta=False)
        for n, s in src.items():
            assert s.min() >= 0 and s.max() <= 1
            assert s.shape == (ci[n].shape[-1:] if shared else ci[n].shape)
        assert loss_of(src, None) > rand


def test_subset_routes_are_non_empty_per_datapoint():
    routes = subset_routes(["a", "b", "c"], (50, 3), torch.device("cpu"))
    stacked = torch.stack(list(routes.values()), -1)  # (50, 3, 3)
    assert stacked.any(-1).all()
    assert not stacked.all()


def test_every_loss_type_backpropagates_to_components_and_ci():
    from spd_mcp.model.config import parse_config
    from spd_mcp.model.decompose import compute_losses

    cfg = parse_config({
        "name": "t",
        "target": {"factory": "tests.byo_model:make", "data": "tests.byo_model:data"},
        "modules": [{"pattern": "*", "C": 4}],
        "losses": [
            {"type": "faithfulness", "coeff": 1},
            {"type": "importance_minimality", "coeff": 1, "p": 2, "p_final": 0.5},
            {"type": "stochastic_recon", "coeff": 1},
            {"type": "stochastic_recon", "coeff": 1, "routing": "layerwise"},
            {"type": "stochastic_recon", "coeff": 1, "routing": "subset"},
            {"type": "ci_masked_recon", "coeff": 1},
            {"type": "pgd_recon", "coeff": 1, "sources": "shared"},
        ],
        "steps": 10, "batch_size": 4, "lr": 1e-3, "output_loss": "kl",
    })
    cm = _cm()
    ids = torch.randint(0, 11, (4, 4))
    terms = compute_losses(cm, cfg, ids, output_loss="kl", step=3)
    assert len(terms) == 7
    for name, value in terms.items():
        if name == "faithfulness":
            continue
        cm.zero_grad()
        value.backward(retain_graph=True)
        ci_grad = sum(p.grad.abs().sum() for p in cm.ci_fns.parameters() if p.grad is not None)
        assert ci_grad > 0, f"{name} gives the CI functions no gradient"


def test_position_mask_ignores_masked_positions():
    a = torch.randn(2, 5, 7)
    b = a.clone()
    b[:, 3:] += torch.randn(2, 2, 7)  # differ only on positions 3, 4
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, :3] = True
    for kind in ("kl", "mse"):
        assert L.output_divergence(kind, a, b, mask).abs() < 1e-6
        assert L.output_divergence(kind, a, b, ~mask) > 0


def test_layerwise_sampling_picks_distinct_single_layers():
    from spd_mcp.model.masks import route_sets

    names = [f"l{i}" for i in range(12)]
    assert route_sets("layerwise", names) == [[n] for n in names]
    picked = route_sets("layerwise", names, sample=3)
    assert len(picked) == 3 and all(len(s) == 1 for s in picked)
    assert len({s[0] for s in picked}) == 3
    assert route_sets("all", names, sample=3) == [names]
