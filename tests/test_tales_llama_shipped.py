"""The `tales-llama` run shipped inside the package (a Hugging Face LlamaForCausalLM on the tales
corpus): loads offline, checksums hold, exports as save_pretrained, and meets its figures."""

import json
import subprocess
import sys

import pytest
import torch

from spd_mcp.model.run_io import load_run
from spd_mcp.model.zoo.tales.corpus import probe_families
from spd_mcp.paths import shipped_runs_dir

SHIPPED = shipped_runs_dir() / "tales-llama"


def test_shipped_run_is_present_and_small():
    assert (SHIPPED / "DONE").exists()
    manifest = json.loads((SHIPPED / "manifest.json").read_text())["sha256"]
    assert {"run.json", "target.safetensors", "components.safetensors", "hf/tokenizer.json",
            "hf/config.json"} <= set(manifest)
    size = sum((SHIPPED / name).stat().st_size for name in manifest)
    assert size < 20 * 2**20, f"shipped run is {size / 2**20:.1f} MB"


def test_loads_as_a_transformers_llama_with_canonical_names():
    run = load_run("tales-llama")
    assert type(run.target.model).__name__ == "LlamaForCausalLM"
    names = [run.target.topology.to_canonical(n) for n in run.model.layer_names]
    assert names[:7] == ["0.attn.q", "0.attn.k", "0.attn.v", "0.attn.o", "0.glu.gate",
                         "0.glu.up", "0.glu.down"] and len(names) == 14
    tok = run.target.text.tokenizer
    ids = torch.tensor([tok.encode("once upon a time there was a girl named mia .")])
    out, ci = run.model.ci_for(ids)
    full = run.model(ids, masks={n: torch.ones_like(g) for n, g in ci.lower.items()},
                     delta_masks=dict.fromkeys(ci.lower, 1.0))
    assert (full - out).abs().max().item() < 1e-4


@pytest.mark.slow
def test_shipped_decomposition_meets_its_figures():
    r = subprocess.run([sys.executable, "-m", "spd_mcp.cli", "evaluate", "tales-llama", "--json"],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    print(json.dumps({k: result[k] for k in ("behaviours", "kl_ci", "kl_stochastic")}))
    assert set(result["behaviours"]) == set(probe_families("v2"))
    for name, row in result["behaviours"].items():
        assert row["target_top1"] >= 0.98, (name, row)
        assert row["ci_top1"] >= 0.98, (name, row)
    assert result["kl_ci"] <= 0.02
    assert len(result["layers"]) == 14
    for layer, row in result["layers"].items():
        assert row["alive"] > 0, layer
        assert row["delta_ratio"] < 0.05, (layer, row)
