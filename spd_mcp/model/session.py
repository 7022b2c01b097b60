"""A loaded run prepared for analysis: topology, key space, text target and natural CI.

Analyses address layers by canonical name (``0.attn.q``); the ComponentModel uses module paths
(``blocks.0.attn.q``). :class:`RunSession` converts at this boundary and nowhere else. What the
target offers beyond its weights (tokenizer, text, behaviours) comes from its adapter as a
:class:`~spd_mcp.model.text_target.TextTarget`; the structure from its
:class:`~spd_mcp.model.topology.Topology`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from spd_mcp.errors import AnalysisError
from spd_mcp.keys import ComponentKey, KeySpace
from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.run_io import LoadedRun, load_run
from spd_mcp.model.text_target import PlantedBehaviour, TextTarget, TextTokenizer
from spd_mcp.model.topology import Topology

__all__ = ["AnalysisError", "NaturalCI", "RunSession"]


@dataclass
class NaturalCI:
    """Target logits (T, V) and natural CI per canonical layer (T, C) for one prompt."""

    logits: Tensor
    ci: dict[str, Tensor]
    acts: dict[str, Tensor]


class RunSession:
    """Everything analyses need about one run. Not thread-safe: run analyses on one worker."""

    def __init__(self, run: LoadedRun) -> None:
        self.run = run
        self.cm: ComponentModel = run.model
        self.device = next(self.cm.parameters()).device
        self.topology: Topology = run.target.topology or Topology.identity(run.model.layer_names)
        self.to_canonical = {m: self.topology.to_canonical(m) for m in self.cm.layer_names}
        self.to_module = {c: m for m, c in self.to_canonical.items()}
        self.text: TextTarget | None = run.target.text
        self.tokenizer: Any = self.text.tokenizer if self.text is not None else None
        vocab = self.tokenizer.vocab_size if self.tokenizer is not None else None
        self.keys = KeySpace({self.to_canonical[m]: C for m, C in self.cm.Cs.items()}, vocab)
        self.max_len: int | None = self.topology.max_len
        self.memo: dict[str, Any] = {}
        """Results analyses compute once per run (e.g. the background CI)."""

    @classmethod
    def load(cls, ref: str, *, device: str = "cpu") -> RunSession:
        return cls(load_run(ref, device=device))

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def layers(self) -> list[str]:
        """Decomposed canonical layers in forward order."""
        return self.keys.layers

    @property
    def is_language_model(self) -> bool:
        return self.text is not None

    def behaviours(self) -> Mapping[str, PlantedBehaviour]:
        """Planted behaviours of the target (empty for models without them)."""
        return self.text.behaviours() if self.text is not None else {}

    # ------------------------------------------------------------------------------- text
    def require_lm(self) -> TextTarget:
        if self.text is None:
            raise AnalysisError(
                f"run {self.run.name!r} has no tokenizer (a toy model); text tools need a "
                "language-model run such as 'tales'"
            )
        return self.text

    @property
    def tok(self) -> TextTokenizer:
        """The tokenizer (an error for toy models)."""
        return self.require_lm().tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids (with BOS) of ``text``; unknown words and over-long text are errors."""
        tok = self.tok
        if not isinstance(text, str) or not text.strip():
            raise AnalysisError("text is empty; give at least one word")
        unknown = self.unknown_words(text)
        if unknown:
            raise AnalysisError(
                f"words not in the vocabulary: {unknown[:20]}; the tokenizer is word-level and "
                "lower-case with punctuation as separate words (e.g. 'the ball was red .'); "
                "use `tokenize` to check a text"
            )
        ids = tok.encode(text)
        if self.max_len is not None and len(ids) > self.max_len:
            raise AnalysisError(
                f"text has {len(ids)} tokens (with BOS); the model's context is {self.max_len}"
            )
        return ids

    def unknown_words(self, text: str) -> list[str]:
        """Words of ``text`` the tokenizer maps to its unknown token, sorted (none for
        tokenizers that are not word-level: byte-level BPE encodes any text)."""
        tok = self.tok
        if not getattr(tok, "word_level", True):
            return []
        return sorted({w for w in text.split() if tok.token_to_id(w) == tok.unk_id})

    def token_id(self, token: str) -> int:
        """Id of one vocabulary word."""
        tok = self.tok
        tid = tok.token_to_id(token)
        if tid == tok.unk_id and token != "<unk>":
            hint = ("" if getattr(tok, "word_level", True) else
                    "; give one token as `tokenize` shows it (e.g. ' the', with its space)")
            raise AnalysisError(f"token {token!r} is not in the vocabulary{hint}")
        return int(tid)

    def phrase_ids(self, text: str) -> list[list[int]]:
        """The id sequences ``text`` can appear as inside a document: word by word for a
        word-level tokenizer; for a subword tokenizer its pieces with and without a leading
        space (`` ball`` mid-sentence, ``ball`` at a line start)."""
        tok = self.tok
        if getattr(tok, "word_level", True):
            return [[self.token_id(w) for w in text.split()]]
        plain = tok.encode_plain  # type: ignore[attr-defined]
        variants = [plain(text)] + ([] if text.startswith(" ") else [plain(" " + text)])
        out: list[list[int]] = []
        for v in variants:
            if v and v not in out:
                out.append(v)
        if not out:
            raise AnalysisError(f"{text!r} encodes to no tokens")
        return out

    @property
    def token_sep(self) -> str:
        """What joins token strings into text: a space between words (word-level), nothing
        between subword pieces (their readable forms carry their own spaces)."""
        return " " if getattr(self.tokenizer, "word_level", True) else ""

    def join_tokens(self, tokens: list[str]) -> str:
        """Token strings as text (see :attr:`token_sep`)."""
        return self.token_sep.join(tokens)

    def token_str(self, token_id: int) -> str:
        if self.tokenizer is None:
            return str(token_id)
        return str(self.tokenizer.id_to_token(int(token_id)))

    def tokens(self, ids: list[int]) -> list[str]:
        return [self.token_str(i) for i in ids]

    def ids_tensor(self, ids: list[int]) -> Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)

    # ------------------------------------------------------------------------------- CI
    def to_canonical_dict(self, d: dict[str, Tensor]) -> dict[str, Tensor]:
        return {self.to_canonical[m]: v for m, v in d.items()}

    def to_module_dict(self, d: dict[str, Any]) -> dict[str, Any]:
        return {self.to_module[c]: v for c, v in d.items()}

    @torch.no_grad()
    def natural_ci(self, ids: list[int]) -> NaturalCI:
        """Target logits and natural CI / component activations at every position."""
        x = self.ids_tensor(ids)
        out, inputs, acts = self.cm.forward_with_inputs(x, acts=True)
        ci = self.cm.compute_ci(inputs)
        assert acts is not None
        return NaturalCI(
            logits=out[0],
            ci={self.to_canonical[m]: g[0] for m, g in ci.lower.items()},
            acts={self.to_canonical[m]: a[0] for m, a in acts.items()},
        )

    def component_vectors(self, key: ComponentKey) -> tuple[Tensor, Tensor]:
        """(read vector V[:, c] (d_in,), write vector U[c] (d_out,))."""
        comp = self.cm.component(self.to_module[key.layer])
        return comp.V[:, key.c].detach(), comp.U[key.c].detach()
