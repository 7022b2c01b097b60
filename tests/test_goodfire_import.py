"""Importing Goodfire ``spd`` runs: real tiny runs made by Goodfire's own code
(``tests/data/goodfire``, see its README) reproduce Goodfire's numbers after import — target
output, CI, component activations and masked forwards — for every fixture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from spd_mcp.model.goodfire.fmt import GoodfireError, locate
from spd_mcp.model.goodfire.importer import import_goodfire
from spd_mcp.model.run_io import load_run

DATA = Path(__file__).parent / "data" / "goodfire"
FIXTURES = ["tms-5-2-tied", "tms-5-2-id", "resid-mlp-1", "llama-simple-mlp", "llama-simple",
            "gpt2-simple", "hf-gpt2", "dev-layerwise", "dev-global", "old-keys",
            "old-keys-gpt2-simple"]
LMS = {"llama-simple-mlp", "llama-simple", "gpt2-simple", "hf-gpt2", "dev-global",
       "old-keys-gpt2-simple"}


def word_tokenizer(root: Path, vocab: int = 40) -> Path:
    """A word-level tokenizer of ``vocab`` tokens (t0 … t{vocab-1}) saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t2")
    out = root / "tokenizer"
    fast.save_pretrained(str(out))
    return out


def _import(name: str, tmp_path: Path):
    src = DATA / name
    kw: dict = {}
    if name in LMS:
        kw["tokenizer"] = word_tokenizer(tmp_path)
        kw["target_config"] = (src / "hf_config" if name == "hf-gpt2"
                               else src / "pretrain" / "model_config.yaml")
    rep = import_goodfire(src, tmp_path / "run", name=name, **kw)
    return rep, load_run(tmp_path / "run")


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


@pytest.mark.parametrize("name", FIXTURES)
def test_import_reproduces_goodfires_numbers(name: str, tmp_path: Path) -> None:
    ref = json.loads((DATA / name / "reference.json").read_text())
    rep, run = _import(name, tmp_path)
    cm = run.model
    assert list(cm.Cs) == ref["module_paths"] or sorted(cm.Cs) == sorted(ref["module_paths"])
    assert {m: cm.Cs[m] for m in ref["module_paths"]} == dict(ref["C"]) if isinstance(
        ref["C"], dict) else True
    x = (torch.tensor(ref["input"], dtype=torch.long) if name in LMS else _t(ref["input"]))
    tol = {"atol": 2e-5, "rtol": 1e-4}
    with torch.no_grad():
        out, inputs, acts = cm.forward_with_inputs(x, acts=True)
        torch.testing.assert_close(out, _t(ref["target_output"]), **tol)
        ci = cm.compute_ci(inputs)
        for m in ref["module_paths"]:
            torch.testing.assert_close(ci.pre[m], _t(ref["ci_pre_sigmoid"][m]), **tol)
            torch.testing.assert_close(ci.lower[m], _t(ref["ci_lower_leaky"][m]), **tol)
            torch.testing.assert_close(ci.upper[m], _t(ref["ci_upper_leaky"][m]), **tol)
            torch.testing.assert_close(acts[m], _t(ref["component_acts"][m]), **tol)
        torch.testing.assert_close(cm(x, masks=ci.lower), _t(ref["output_ci_masked"]), **tol)
        ones = {m: torch.ones_like(g) for m, g in ci.lower.items()}
        torch.testing.assert_close(cm(x, masks=ones, delta_masks=dict.fromkeys(ones, 1.0)),
                                   _t(ref["output_all_ones_with_delta"]), **tol)
        torch.testing.assert_close(cm(x, masks=ones), _t(ref["output_all_ones_no_delta"]), **tol)
        rand = {m: _t(v) for m, v in ref["random_mask"].items()}
        torch.testing.assert_close(cm(x, masks=rand), _t(ref["output_random_mask"]), **tol)
    # provenance is kept and the run is an ordinary spd-mcp run
    prov = json.loads((run.path / "goodfire.json").read_text())
    assert prov["checkpoint"] == ref["checkpoint"]
    assert rep.step == int(ref["checkpoint"].removeprefix("model_").removesuffix(".pth"))


def test_latest_checkpoint_is_the_highest_step() -> None:
    assert locate(DATA / "tms-5-2-tied").checkpoint.name == "model_10.pth"  # not model_8


def test_lm_without_its_architecture_or_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    src = tmp_path / "run"
    shutil.copytree(DATA / "llama-simple", src)
    shutil.rmtree(src / "pretrain")
    with pytest.raises(GoodfireError, match=r"LlamaSimple.*--target-config.*model_config.yaml"):
        import_goodfire(src, tmp_path / "out", name="x", tokenizer=word_tokenizer(tmp_path))
    with pytest.raises(GoodfireError, match=r"needs its tokenizer.*--tokenizer"):
        import_goodfire(DATA / "llama-simple", tmp_path / "out", name="x",
                        target_config=DATA / "llama-simple" / "pretrain" / "model_config.yaml")
    assert not (tmp_path / "out").exists()


def test_unsupported_values_name_the_config_key(tmp_path: Path) -> None:
    src = tmp_path / "run"
    shutil.copytree(DATA / "tms-5-2-tied", src)
    cfg = (src / "final_config.yaml").read_text()
    (src / "final_config.yaml").write_text(cfg.replace("sigmoid_type: leaky_hard",
                                                       "sigmoid_type: swish_hard"))
    with pytest.raises(GoodfireError, match=r"sigmoid_type: 'swish_hard' is not supported"):
        import_goodfire(src, tmp_path / "out", name="x")
    (src / "final_config.yaml").write_text(cfg.replace(
        "spd.experiments.tms.models.TMSModel", "spd.experiments.ih.models.InductionModel"))
    with pytest.raises(GoodfireError, match=r"pretrained_model_class: .*InductionModel"):
        import_goodfire(src, tmp_path / "out", name="x")
    assert not (tmp_path / "out").exists()
