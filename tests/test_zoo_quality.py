"""Ground truth: the zoo decompositions recover the known solutions (slow; CI runs them).

Each slow test is one ``spd-mcp zoo build`` with the toy's default recipe (one seed, CPU, one
thread) and ``spd-mcp evaluate --json``, held to the SPD paper's figures (the toy's
``paper_shortfalls``). Toys whose build takes more than 5 CPU-minutes ship a run instead, and CI
evaluates that (fast); ``benchmarks/zoo_recipes.py`` rebuilds them (and every toy over several
seeds); ``docs/zoo.md`` has the results.
"""

import json
import subprocess
import sys
import time

import pytest

from spd_mcp.model.zoo import get_entry


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spd_mcp.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def _build_and_evaluate(name: str, out: str, *extra: str) -> dict:
    t0 = time.time()
    r = _cli("zoo", "build", name, "--out", out, "--device", "cpu", "--threads", "1", *extra)
    build_s = time.time() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli("evaluate", out, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    print(json.dumps({"build_seconds": round(build_s, 1), **result}))
    return result


@pytest.mark.slow
def test_tms_5_2_recovers_every_feature(tmp_path):
    result = _build_and_evaluate("tms-5-2", str(tmp_path / "tms"))
    for layer in ("linear1", "linear2"):
        row = result["layers"][layer]
        assert row["alive"] == 5, (layer, row)
        assert row["mmcs"] >= 0.99, (layer, row)
        assert 0.95 <= row["ml2r"] <= 1.05, (layer, row)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tms-5-2-id", "resid-mlp"])
def test_toy_reaches_the_papers_figures(name, tmp_path):
    """Alive counts per layer as the paper finds them, MMCS / ML2R (TMS, Table 1) or neuron
    contributions and one mlp_in component per feature (ResidMLP, Figs. 6-8, 10-13)."""
    result = _build_and_evaluate(name, str(tmp_path / name))
    assert get_entry(name).paper_shortfalls(result) == []


# What each shipped run's validity verdict fails, and why (docs/zoo.md): the 5%-of-C L0 bar is a
# sparsity bar that CI functions with a low positive CI on other features' inputs cross in
# linear1, and that the identity, dense by the paper's account (all 10 components on every
# input), crosses by design.
KNOWN_VERDICT_FAILURES = {
    "tms-5-2": set(),
    "tms-40-10": {"linear1: L0"},
    "tms-40-10-id": {"linear1: L0", "hidden_layers.0: L0"},
}


@pytest.mark.parametrize("name", sorted(KNOWN_VERDICT_FAILURES))
def test_shipped_run_reaches_the_papers_figures(name):
    """A shipped toy run (toys whose build takes over 5 CPU-minutes ship one, seed 0, and
    ``benchmarks/zoo_recipes.py --toys NAME`` rebuilds it; tms-5-2 ships for the tools' tests):
    its evaluation meets the paper's figures and the validity verdict, and it was built with the
    recipe the entry has now (a recipe change without a re-shipped run fails here)."""
    from spd_mcp.model.config import parse_config
    from spd_mcp.paths import shipped_runs_dir

    r = _cli("evaluate", name, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert get_entry(name).paper_shortfalls(result) == []
    failed = {f.split(" of C=")[0].rsplit(" ", 1)[0] if ": L0 " in f else f
              for f in result["validity"]["failures"]}
    assert failed == KNOWN_VERDICT_FAILURES[name], result["validity"]["verdict"]
    config = json.loads((shipped_runs_dir() / name / "run.json").read_text())["config"]
    recipe = parse_config(get_entry(name).default_config()).model_dump(mode="json")
    assert parse_config(config).model_dump(mode="json") == recipe  # new keys take defaults
