"""Word-level tokenizer for the `tales` corpus (offline, plain-JSON serialisation)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spd_mcp.model.zoo.tales.corpus import TalesCorpus

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
FORMAT = "spd-mcp/word-tokenizer"
VERSION = 1
FILENAME = "tokenizer.json"


class Tokenizer:
    """Whitespace word tokenizer: ids 0-3 are `<pad> <bos> <eos> <unk>`, then the vocabulary."""

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
    word_level = True

    def __init__(self, vocabulary: Iterable[str]) -> None:
        words = sorted(set(vocabulary) - set(SPECIAL_TOKENS))
        if any(not w or any(c.isspace() for c in w) for w in words):
            raise ValueError("vocabulary words must be non-empty and contain no whitespace")
        self._id_to_token: list[str] = [*SPECIAL_TOKENS, *words]
        self._token_to_id: dict[str, int] = {t: i for i, t in enumerate(self._id_to_token)}

    @classmethod
    def from_corpus(cls, corpus: TalesCorpus | type[TalesCorpus]) -> Tokenizer:
        """Tokenizer over the corpus grammar's full vocabulary."""
        return cls(corpus.vocabulary())

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    @property
    def vocabulary(self) -> list[str]:
        """All tokens, indexed by id (special tokens first)."""
        return list(self._id_to_token)

    def token_to_id(self, token: str) -> int:
        return self._token_to_id.get(token, self.unk_id)

    def id_to_token(self, token_id: int) -> str:
        return self._id_to_token[token_id]

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Split on whitespace and map words to ids (unknown words -> `<unk>`)."""
        ids = [self.token_to_id(w) for w in text.split()]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Join tokens with single spaces; `<pad>/<bos>/<eos>` are dropped by default."""
        drop = {self.pad_id, self.bos_id, self.eos_id} if skip_special else set()
        return " ".join(self._id_to_token[int(i)] for i in ids if int(i) not in drop)

    def to_dict(self) -> dict[str, object]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "special_tokens": list(SPECIAL_TOKENS),
            "vocabulary": self._id_to_token[len(SPECIAL_TOKENS) :],
        }

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (``path`` may be a directory or a ``.json`` file)."""
        path = Path(path)
        if path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / FILENAME
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a file written by :meth:`save` (``path`` may be its directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"{path}: not a {FORMAT} v{VERSION} file")
        if data["special_tokens"] != list(SPECIAL_TOKENS):
            raise ValueError(f"{path}: unexpected special tokens {data['special_tokens']}")
        tokenizer = cls(data["vocabulary"])
        if tokenizer._id_to_token[len(SPECIAL_TOKENS) :] != data["vocabulary"]:
            raise ValueError(f"{path}: vocabulary must be sorted and unique")
        return tokenizer

    def to_hf(self):  # -> transformers.PreTrainedTokenizerFast
        """The same tokenizer as a ``transformers`` ``PreTrainedTokenizerFast`` (word-level,
        whitespace split, ``<bos>`` prepended, the same ids), e.g. to ship with a Hugging Face
        model; ``save_pretrained`` writes it in the standard layout."""
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        vocab = {t: i for i, t in enumerate(self._id_to_token)}
        rust = RustTokenizer(models.WordLevel(vocab, unk_token=UNK))
        rust.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        rust.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", special_tokens=[(BOS, self.bos_id)])
        rust.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
        return PreTrainedTokenizerFast(tokenizer_object=rust, bos_token=BOS, eos_token=EOS,
                                       unk_token=UNK, pad_token=PAD)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self._id_to_token == other._id_to_token

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"
