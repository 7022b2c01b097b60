"""A loaded run prepared for analysis: topology, key space, tokenizer and natural CI.

Analyses address layers by canonical name (``0.attn.q``); the ComponentModel uses module paths
(``blocks.0.attn.q``). :class:`RunSession` converts at this boundary and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from spd_mcp.keys import ComponentKey, KeySpace
from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.run_io import LoadedRun, load_run
from spd_mcp.model.topology import Topology
from spd_mcp.model.zoo.transformer import Transformer


class AnalysisError(ValueError):
    """Bad input to an analysis; the message says what is wrong and what is valid."""


def topology_for(run: LoadedRun) -> Topology:
    model = run.target.model
    if isinstance(model, Transformer):
        return Topology.for_transformer(model.config)
    return Topology.identity(run.model.layer_names)


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
        self.topology = topology_for(run)
        self.to_canonical = {m: self.topology.to_canonical(m) for m in self.cm.layer_names}
        self.to_module = {c: m for m, c in self.to_canonical.items()}
        self.tokenizer: Any = getattr(run.target.entry, "tokenizer", None)
        vocab = self.tokenizer.vocab_size if self.tokenizer is not None else None
        self.keys = KeySpace({self.to_canonical[m]: C for m, C in self.cm.Cs.items()}, vocab)
        model = run.target.model
        self.max_len: int | None = model.config.max_len if isinstance(model, Transformer) else None

    @classmethod
    def load(cls, ref: str, *, device: str = "cpu") -> RunSession:
        return cls(load_run(ref, device=device))

    @property
    def layers(self) -> list[str]:
        """Decomposed canonical layers in forward order."""
        return self.keys.layers

    @property
    def is_language_model(self) -> bool:
        return self.tokenizer is not None

    # ------------------------------------------------------------------------------- text
    def require_lm(self) -> None:
        if not self.is_language_model:
            raise AnalysisError(
                f"run {self.run.name!r} has no tokenizer (a toy model); text tools need a "
                "language-model run such as 'tales'"
            )

    def encode(self, text: str) -> list[int]:
        """Token ids (with BOS) of ``text``; unknown words and over-long text are errors."""
        self.require_lm()
        if not isinstance(text, str) or not text.strip():
            raise AnalysisError("text is empty; give at least one word")
        words = text.split()
        unk = self.tokenizer.unk_id
        unknown = sorted({w for w in words if self.tokenizer.token_to_id(w) == unk})
        if unknown:
            raise AnalysisError(
                f"words not in the vocabulary: {unknown[:20]}; the tokenizer is word-level and "
                "lower-case with punctuation as separate words (e.g. 'the ball was red .'); "
                "use `tokenize` to check a text"
            )
        ids = self.tokenizer.encode(text)
        if self.max_len is not None and len(ids) > self.max_len:
            raise AnalysisError(
                f"text has {len(ids)} tokens (with BOS); the model's context is {self.max_len}"
            )
        return ids

    def token_id(self, token: str) -> int:
        """Id of one vocabulary word."""
        self.require_lm()
        tid = self.tokenizer.token_to_id(token)
        if tid == self.tokenizer.unk_id and token != "<unk>":
            raise AnalysisError(f"token {token!r} is not in the vocabulary")
        return int(tid)

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
