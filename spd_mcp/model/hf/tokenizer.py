"""A ``transformers`` tokenizer behind the :class:`~spd_mcp.model.text_target.TextTokenizer`
protocol the text tools use.

Token strings are shown readably: a byte-level BPE piece such as ``Ġthe`` is shown as `` the``
(what it decodes to); ``token_to_id`` accepts either form.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from spd_mcp.errors import InputError


class HFTokenizerError(InputError):
    """A tokenizer that cannot be loaded or does not fit the model."""


class HFTokenizer:
    """Wraps a ``PreTrainedTokenizerBase``. ``encode`` adds what the tokenizer itself adds (a BOS
    for Llama-style tokenizers, nothing for GPT-2)."""

    def __init__(self, tok: Any) -> None:
        self.hf = tok
        backend = getattr(tok, "backend_tokenizer", None)
        self.word_level: bool = type(getattr(backend, "model", None)).__name__ == "WordLevel"
        """A word-level vocabulary (e.g. `tales` wrapped): unknown words map to ``unk_id``."""
        eos = tok.eos_token_id
        self.eos_id: int = int(eos) if eos is not None else -1
        pad = tok.pad_token_id
        self.pad_id: int = int(pad) if pad is not None else max(self.eos_id, 0)
        unk = tok.unk_token_id
        self.unk_id: int = int(unk) if self.word_level and unk is not None else -1
        """Subword tokenizers: -1 (byte-level vocabularies have no unknown text; their own unk
        token, if any, is an ordinary entry). Word-level: the unk token's id."""

    @classmethod
    def load(cls, path: str | Path) -> HFTokenizer:
        """From a directory written by ``save_pretrained`` or a ``tokenizer.json`` file."""
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        p = Path(path)
        try:
            if p.is_file() and p.suffix == ".json":
                return cls(PreTrainedTokenizerFast(tokenizer_file=str(p)))
            if not p.is_dir():
                raise HFTokenizerError(f"tokenizer not found: {p} (a directory or tokenizer.json)")
            return cls(AutoTokenizer.from_pretrained(str(p), local_files_only=True))
        except HFTokenizerError:
            raise
        except Exception as e:  # transformers raises OSError / ValueError variants
            raise HFTokenizerError(f"cannot load a tokenizer from {p}: {e}") from None

    def save(self, directory: Path) -> None:
        self.hf.save_pretrained(str(directory))

    @cached_property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=True)["input_ids"])

    def encode_plain(self, text: str) -> list[int]:
        """Ids without special tokens (a continuation, a target token)."""
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=True))

    @cached_property
    def _readable(self) -> list[str]:
        """Readable string of every id (what the id decodes to; special tokens as themselves)."""
        special = set(self.hf.all_special_ids)
        out = []
        for i in range(self.vocab_size):
            out.append(self.hf.convert_ids_to_tokens(i) if i in special
                       else self.hf.decode([i], clean_up_tokenization_spaces=False))
        return out

    @cached_property
    def _by_readable(self) -> dict[str, int]:
        index: dict[str, int] = {}
        for i, s in enumerate(self._readable):
            index.setdefault(s, i)
        return index

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            return f"<id {token_id}>"
        return self._readable[token_id]

    def token_to_id(self, token: str) -> int:
        """Id of a token given as its piece (``Ġthe``) or as what it decodes to (`` the``);
        ``unk_id`` when it is neither."""
        tid = self._pieces.get(token)
        if tid is not None:
            return tid
        return self._by_readable.get(token, self.unk_id)

    @cached_property
    def _pieces(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.hf.get_vocab().items()}
