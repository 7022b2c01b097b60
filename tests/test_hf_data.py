"""Text sources for Hugging Face targets: plain text, JSONL, a saved `datasets` dataset; the
held-out split; windows; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spd_mcp.model.config import TextData, load_config
from spd_mcp.model.hf.data import TextDataError, TextDocuments, read_documents

DOCS = [f"story {i} about a ball" for i in range(20)]


def _encode(text: str) -> list[int]:
    return [len(w) for w in text.split()]


def test_plain_jsonl_and_datasets_sources_read_the_same_documents(tmp_path: Path) -> None:
    txt = tmp_path / "d.txt"
    txt.write_text("\n".join(DOCS[:10]) + "\n\n" + "\n".join(DOCS[10:]) + "\n")  # blank skipped
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(saved))
    for src in (txt, jsonl, saved):
        assert read_documents(src) == DOCS, src
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": DOCS})}).save_to_disk(
        str(dd))
    assert read_documents(dd, "body") == DOCS


def test_heldout_is_the_tail_and_never_in_the_training_stream(tmp_path: Path) -> None:
    f = tmp_path / "d.txt"
    f.write_text("\n".join(DOCS) + "\n")
    docs = TextDocuments(TextData(text=str(f), context=4, heldout_frac=0.25), _encode)
    assert docs.train == DOCS[:15] and docs.heldout == DOCS[15:]
    assert docs.stream.tolist() == [t for d in DOCS[:15] for t in _encode(d)]
    torch.manual_seed(0)
    w = docs.windows(8, "cpu")
    assert w.shape == (8, 4)
    stream = docs.stream.tolist()
    for row in w.tolist():  # every window is a contiguous slice of the training stream
        assert any(stream[i : i + 4] == row for i in range(len(stream) - 3))


def test_bad_sources_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(TextDataError, match="does not exist"):
        read_documents(tmp_path / "nope.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(TextDataError, match=r"bad.jsonl:2: no string field 'text'"):
        read_documents(bad)
    bad.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(TextDataError, match=r"bad.jsonl:2: not JSON"):
        read_documents(bad)
    one = tmp_path / "one.txt"
    one.write_text("only one document\n")
    with pytest.raises(TextDataError, match="need at least two"):
        _ = TextDocuments(TextData(text=str(one)), _encode).train
    short = tmp_path / "short.txt"
    short.write_text("a b\nc d\n")
    with pytest.raises(TextDataError, match="fewer than one window"):
        _ = TextDocuments(TextData(text=str(short), context=64), _encode).stream


def test_config_file_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "text.txt").write_text("a\nb\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "name: x\ntarget: {huggingface: model}\ndata: {text: text.txt}\n"
        "modules: [{pattern: '*.attn.*', C: 4}]\n"
        "losses: [{type: stochastic_recon, coeff: 1}]\nsteps: 1\nbatch_size: 1\nlr: 0.001\n")
    c = load_config(cfg)
    assert c.target.huggingface == str(tmp_path / "model")
    assert c.data is not None and c.data.text == str(tmp_path / "text.txt")
    cfg.write_text(cfg.read_text().replace("huggingface: model", "huggingface: openai/gpt2"))
    assert load_config(cfg).target.huggingface == "openai/gpt2"  # a hub name stays as given


@pytest.mark.parametrize("family", ["gpt2", "llama", "pythia"])
def test_example_configs_are_valid(family: str) -> None:
    root = Path(__file__).resolve().parents[1] / "examples" / "hf"
    cfg = load_config(root / f"{family}.yaml")
    # the model directories do not exist here, so the paths stay as written (a missing
    # relative path reads as a possible hub name: decomposing it says to save_pretrained)
    assert cfg.target.huggingface == f"models/{family}"
    assert cfg.data is not None and cfg.data.context >= 128
