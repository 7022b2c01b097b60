"""Tests for the `tales` word-level tokenizer."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from spd_mcp.model.zoo.tales.corpus import TalesCorpus
from spd_mcp.model.zoo.tales.tokenizer import SPECIAL_TOKENS, Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_corpus(TalesCorpus(0))


def test_special_tokens_and_sorted_vocabulary(tokenizer: Tokenizer) -> None:
    assert SPECIAL_TOKENS == ("<pad>", "<bos>", "<eos>", "<unk>")
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i and tokenizer.id_to_token(i) == token
    words = tokenizer.vocabulary[len(SPECIAL_TOKENS) :]
    assert words == TalesCorpus.vocabulary()
    assert tokenizer.vocab_size == len(words) + 4


def test_round_trip_on_corpus_text(tokenizer: Tokenizer) -> None:
    for story in itertools.islice(TalesCorpus(1).stories(), 2000):
        ids = tokenizer.encode(story)
        assert ids[0] == tokenizer.bos_id
        assert tokenizer.unk_id not in ids
        assert tokenizer.decode(ids) == story


def test_encode_options(tokenizer: Tokenizer) -> None:
    text = "the dog is happy ."
    plain = tokenizer.encode(text, bos=False)
    assert len(plain) == 5
    assert tokenizer.encode(text) == [tokenizer.bos_id, *plain]
    assert tokenizer.encode(text, eos=True)[-1] == tokenizer.eos_id
    assert tokenizer.decode([*plain, tokenizer.pad_id]) == text
    assert tokenizer.decode([tokenizer.bos_id, *plain], skip_special=False) == "<bos> " + text


def test_unknown_words_map_to_unk(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("the zyzzyva is happy", bos=False)
    assert ids[1] == tokenizer.unk_id
    assert tokenizer.decode(ids) == "the <unk> is happy"


def test_save_load(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tokenizer.save(tmp_path)
    assert path.name == "tokenizer.json"
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["special_tokens"] == list(SPECIAL_TOKENS)
    loaded = Tokenizer.load(tmp_path)
    assert loaded == tokenizer
    assert Tokenizer.load(path).vocabulary == tokenizer.vocabulary
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="v1"):
        Tokenizer.load(path)
