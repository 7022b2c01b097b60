"""Hugging Face causal LMs as targets: tiny random GPT-2, Llama (grouped-query attention) and
GPT-NeoX models built here, decomposed, saved, reloaded; exact reconstruction, the fast graph
against the per-node reference (fused qkv included), and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spd_mcp.analysis.graph import _modes, compute_graph, compute_graph_reference
from spd_mcp.errors import InputError
from spd_mcp.model.config import parse_config
from spd_mcp.model.decompose import decompose
from spd_mcp.model.run_io import load_run
from spd_mcp.model.targets import TargetError
from tests.hf_models import FAMILIES, hf_config, make_model, save_tiny
from tests.test_graph import assert_canonical, assert_same_graph

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family → (model directory, saved run directory)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for fam in FAMILIES:
        d, text = save_tiny(fam, root)
        run = decompose(parse_config(hf_config(fam, d, text, steps=10)), out=root / f"run-{fam}")
        out[fam] = (d, run)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_all_ones_masks_with_delta_reproduce_the_hf_model(hf_runs, family: str) -> None:
    from transformers import AutoModelForCausalLM

    model_dir, run_dir = hf_runs[family]
    run = load_run(run_dir)
    tok = run.target.text.tokenizer
    ids = torch.tensor([tok.encode(run.target.text.heldout_text(0))[:40]])
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    with torch.no_grad():
        want = hf(ids).logits
        cm = run.model
        T = ids.shape[1]
        ones = {n: torch.ones(1, T, C) for n, C in cm.Cs.items()}
        got = cm(ids, masks=ones, delta_masks=dict.fromkeys(cm.Cs, 1.0))
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5
    # canonical names, in forward order, as the key grammar says
    names = run.target.topology.decomposable()
    expect = {"gpt2": ["0.attn.qkv", "0.attn.o", "0.mlp.up", "0.mlp.down"],
              "llama": ["0.attn.q", "0.attn.k", "0.attn.v", "0.attn.o",
                        "0.glu.gate", "0.glu.up", "0.glu.down"],
              "gpt_neox": ["0.attn.qkv", "0.attn.o", "0.mlp.up", "0.mlp.down"]}[family]
    assert list(names[: len(expect)]) == expect


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_graph_equals_reference(hf_runs, family: str) -> None:
    run = load_run(hf_runs[family][1])
    cm, topo = run.model, run.target.topology
    T = 10
    ids = torch.tensor(run.target.text.tokenizer.encode(run.target.text.heldout_text(1))[:T])
    assert ids.numel() == T
    modes = _modes(cm, topo, T)
    assert set(modes.values()) <= {"local", "attn"}, modes  # no slow general fallback
    assert "attn" in modes.values()
    torch.manual_seed(1)
    ci = {n: (torch.rand(T, C) < 0.4) * torch.rand(T, C).clamp(0.05) for n, C in cm.Cs.items()}
    kw = {"output_positions": [4, T - 1], "top_k_outputs": 3}
    fast = compute_graph(cm, topo, ids, ci, **kw)
    ref = compute_graph_reference(cm, topo, ids, ci, **kw)
    assert_same_graph(fast, ref)
    assert_canonical(fast)
    pos = fast.node_pos
    cross = pos[fast.edge_src] != pos[fast.edge_tgt]
    assert bool(cross.any())  # attention carries edges across positions
    tgt_layers = {fast.node_layer[i] for i in fast.edge_tgt[cross].tolist()}
    assert tgt_layers <= {"0.attn.o", "1.attn.o"}


def _config(model_dir: Path, text: Path, **target) -> dict:
    cfg = hf_config("gpt2", model_dir, text, steps=1)
    cfg["target"] = {"huggingface": str(model_dir), **target}
    return cfg


def test_hub_name_is_an_error_saying_save_pretrained(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("a b\nc d\n")
    cfg = parse_config(_config(Path("gpt2"), text) | {"target": {"huggingface": "openai/gpt2"}})
    with pytest.raises(TargetError, match=r"hub name.*never downloads.*save_pretrained"):
        decompose(cfg, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_unknown_architecture_needs_a_topology_section(tmp_path: Path, hf_runs) -> None:
    import transformers as tr

    model_dir = tmp_path / "opt"
    tr.OPTForCausalLM(tr.OPTConfig(vocab_size=400, hidden_size=16, num_hidden_layers=1,
                                   ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16,
                                   max_position_embeddings=32)).save_pretrained(str(model_dir))
    gpt2_dir = hf_runs["gpt2"][0]
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / f).write_bytes((gpt2_dir / f).read_bytes())
    text = gpt2_dir.parent / "tales.txt"
    cfg = parse_config(_config(model_dir, text))
    with pytest.raises(TargetError, match=r"OPTForCausalLM.*model_type 'opt'.*topology:"):
        decompose(cfg, out=tmp_path / "run")
    # with a topology naming a module the model lacks: the error lists it
    topo = {"n_blocks": 1, "embed": "model.decoder.embed_tokens", "unembed": "lm_head",
            "final_norm": "model.decoder.final_layer_norm", "norm": "layer",
            "attn": {m: f"model.decoder.layers.{{i}}.self_attn.{m}_proj" for m in "qkv"}
            | {"o": "model.decoder.layers.{i}.self_attn.out_proj"},
            "mlp": {"up": "model.decoder.layers.{i}.fc1", "down": "model.decoder.layers.{i}.fc9"}}
    cfg = parse_config(_config(model_dir, text, topology=topo))
    with pytest.raises(TargetError, match=r"does not have: \['model.decoder.layers.0.fc9'\]"):
        decompose(cfg, out=tmp_path / "run")
    # the right topology decomposes it, with canonical names
    topo["mlp"]["down"] = "model.decoder.layers.{i}.fc2"
    run = decompose(parse_config(_config(model_dir, text, topology=topo)), out=tmp_path / "run")
    meta = json.loads((run / "run.json").read_text())
    assert "model.decoder.layers.0.fc2" in meta["layers"]
    assert load_run(run).target.topology.to_canonical("model.decoder.layers.0.fc2") == "0.mlp.down"


def test_tokenizer_larger_than_the_model_vocab_is_an_error(tmp_path: Path, hf_runs) -> None:
    gpt2_dir = hf_runs["gpt2"][0]
    small = tmp_path / "small"
    make_model("gpt2", 100).save_pretrained(str(small))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (small / f).write_bytes((gpt2_dir / f).read_bytes())
    cfg = parse_config(_config(small, gpt2_dir.parent / "tales.txt"))
    with pytest.raises(TargetError, match=r"tokenizer/model mismatch.*400 tokens.*only 100"):
        decompose(cfg, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_huggingface_target_needs_data(tmp_path: Path) -> None:
    cfg = _config(tmp_path, tmp_path / "t.txt")
    del cfg["data"]
    with pytest.raises(InputError, match=r"needs `data: \{text: FILE\}`"):
        decompose(parse_config(cfg), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_baked_edit_exports_a_save_pretrained_directory(hf_runs, family: str,
                                                        tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spd_mcp.editing.bake import export_baked
    from spd_mcp.editing.edit import ComponentScale, edited_logits, scale_edit
    from spd_mcp.model.session import RunSession

    session = RunSession.load(str(hf_runs[family][1]))
    layer = session.layers[-1]  # the last MLP down projection (a Conv1D for GPT-2)
    edit = scale_edit(session, [ComponentScale(component=f"{layer}:{c}", scale=s)
                                for c, s in ((0, 0.0), (1, 2.5), (2, 0.0))])
    text = session.text.heldout_text(2)
    ids = session.ids_tensor(session.tok.encode(text)[:30])
    with torch.no_grad():
        want = edited_logits(session, edit, ids)
        before = session.run.target.model(ids)
    assert (want - before).abs().max().item() > 1e-3  # the edit changes the model
    out = export_baked(session, edit, tmp_path / "edited")
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok(text)["input_ids"][:30] == ids[0].tolist()
    with torch.no_grad():
        got = hf(ids).logits
    assert (got - want).abs().max().item() < 1e-5


def test_evaluate_and_context_limit_on_an_hf_run(hf_runs) -> None:
    from spd_mcp.errors import AnalysisError
    from spd_mcp.model.session import RunSession
    from spd_mcp.model.validity import validity_of_run

    run = load_run(hf_runs["gpt_neox"][1])
    v = validity_of_run(run, n_batches=2, batch_size=4)
    assert v.data == "6 held-out documents"  # 60 stories, the last 10% held out, capped
    assert [m.layer for m in v.matrices][:2] == ["0.attn.qkv", "0.attn.o"]
    session = RunSession(run)
    with pytest.raises(AnalysisError, match=r"has \d+ tokens .*context is 64"):
        session.encode("the ball " * 45)


def test_cli_decomposes_a_config_file_with_relative_paths(hf_runs, tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    import yaml

    model_dir = hf_runs["llama"][0]
    work = tmp_path / "project"
    shutil.copytree(model_dir, work / "models" / "tiny")
    shutil.copy(model_dir.parent / "tales.txt", work / "stories.txt")
    cfg = hf_config("llama", Path("models/tiny"), Path("stories.txt"), steps=3)
    cfg["target"]["huggingface"] = "models/tiny"
    cfg["data"]["text"] = "stories.txt"
    cfg["modules"] = [{"pattern": "*.attn.[qkv]", "C": 4}, {"pattern": "*.glu.down", "C": 4}]
    (work / "c.yaml").write_text(yaml.safe_dump(cfg))
    home = tmp_path / "home"
    env = {"SPD_MCP_HOME": str(home), "PATH": "/usr/bin:/bin"}
    cli = [sys.executable, "-m", "spd_mcp.cli"]
    r = subprocess.run([*cli, "decompose", str(work / "c.yaml"), "--device", "cpu"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    run = load_run(home / "runs" / "tiny-llama")
    assert list(run.model.Cs) == [f"model.layers.{b}.{m}" for b in (0, 1) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")]
    assert (home / "runs" / "tiny-llama" / "hf" / "tokenizer.json").is_file()
    # a hub name: exit 2, the message says what to do, nothing written
    (work / "c.yaml").write_text(yaml.safe_dump(cfg | {"name": "hub", "target": {
        "huggingface": "meta-llama/Llama-3.2-1B"}}))
    r = subprocess.run([*cli, "decompose", str(work / "c.yaml"), "--device", "cpu"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and "save_pretrained" in r.stderr, r.stderr
    assert not (home / "runs" / "hub").exists()


@pytest.mark.parametrize("name", ["tales-llama", "tales-gpt2"])
def test_tales_on_hf_architectures_build_reload_and_export(name: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spd_mcp.editing.bake import export_baked
    from spd_mcp.editing.edit import Edit
    from spd_mcp.model.session import RunSession
    from spd_mcp.model.zoo import get_entry

    kw = {"d_model": 16, "n_heads": 2}
    cfg = get_entry(name, **kw).default_config()
    cfg["target"]["kwargs"] |= kw
    cfg.update(steps=2, eval_every=2, batch_size=4, eval_batch_size=4)
    run_dir = decompose(parse_config(cfg), out=tmp_path / "run", target_steps=2)
    assert (run_dir / "hf" / "tokenizer.json").is_file()
    session = RunSession.load(str(run_dir))
    assert session.tok.word_level and session.token_str(1) == "<bos>"
    assert session.behaviours()["pronoun"].probes(seed=1, n=1)
    text = "mia found a ball in the park ."
    ids = session.encode(text)
    assert session.tokens(ids)[:3] == ["<bos>", "mia", "found"]
    out = export_baked(session, Edit(), tmp_path / "export")
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok(text)["input_ids"] == ids
    with torch.no_grad():
        want = session.run.target.model(session.ids_tensor(ids))
        got = hf(session.ids_tensor(ids)).logits
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_fused_qkv_parts_are_where_the_model_reads_them(hf_runs, family: str) -> None:
    """Topology.qkv_parts names, per head, the slices of the fused output the model's own code
    sends to attention as q, k and v (found here by differentiating the recorded SDPA inputs)."""
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    run = load_run(hf_runs[family][1])
    topo, model = run.target.topology, run.target.model
    mod = model.get_submodule(topo.to_module("0.attn.qkv"))
    leaf: list[torch.Tensor] = []
    calls: list[tuple] = []

    def hook(_m, _a, out):
        out = out.detach().requires_grad_(True)
        leaf.append(out)
        return out

    class Rec(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                calls.append(args[:3])
            return func(*args, **(kwargs or {}))

    h = mod.register_forward_hook(hook)
    try:
        with torch.enable_grad(), Rec():
            model(torch.tensor([[1, 5, 7]]))
    finally:
        h.remove()
    parts = topo.qkv_parts(leaf[0].shape[-1])
    assert parts is not None
    for p, t in zip("qkv", calls[0], strict=True):
        for head, sl in enumerate(parts[p]):
            (g,) = torch.autograd.grad(t[0, head, 0].sum(), leaf[0], retain_graph=True)
            nz = g[0, 0].nonzero().flatten().tolist()
            assert nz == list(range(sl.start, sl.stop)), (p, head, nz[:4], sl)
