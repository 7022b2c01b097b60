"""Text for text targets: documents from the target's streams, padded batches, and generation.

Shared by harvest-free analyses, editing and measurement; anything model-specific comes from the
session's :class:`~spd_mcp.model.text_target.TextTarget`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import Tensor

from spd_mcp.errors import AnalysisError

from .session import RunSession

TextSource = Literal["train", "heldout"]
Forward = Callable[[Tensor], Tensor]
"""forward(ids (B, T)) -> logits (B, T, vocab): the target, or the target under an edit."""


@dataclass
class Batch:
    """Right-padded ids (B, T) with a mask of real tokens and each row's last real position."""

    ids: Tensor
    mask: Tensor
    last: Tensor  # (B,)


def pad(session: RunSession, rows: Sequence[Sequence[int]]) -> Batch:
    pad_id = session.tok.pad_id
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])
    mask = torch.arange(T)[None] < lengths[:, None]
    dev = session.device
    return Batch(ids.to(dev), mask.to(dev), (lengths - 1).to(dev))


def documents(session: RunSession, source: TextSource, n: int, offset: int = 0) -> list[str]:
    """``n`` documents: ``train`` = the stream SPD was trained on, ``heldout`` = text neither the
    target nor the decomposition saw."""
    text = session.require_lm()
    get = text.dataset_text if source == "train" else text.heldout_text
    total = text.n_documents(source)
    if total is not None:
        n = max(0, min(n, total - offset))
    return [get(offset + i) for i in range(n)]


def dataset_texts(session: RunSession, n: int) -> list[str]:
    """The first ``n`` documents of the stream SPD was trained on."""
    return documents(session, "train", n)


def encode_document(session: RunSession, text: str) -> list[int]:
    """Token ids of a document, cut to the model's context (no validation: dataset text)."""
    return session.tok.encode(text)[: session.max_len or None]


def document_batches(session: RunSession, texts: Sequence[str], batch_size: int) -> list[Batch]:
    """Documents (cut to the context) in right-padded batches of ``batch_size``."""
    rows = [encode_document(session, t) for t in texts]
    return [pad(session, rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def prompt_batch(session: RunSession, prompts: Sequence[str]) -> Batch:
    """Prompts encoded with validation (unknown words are errors naming them)."""
    return pad(session, [session.encode(p) for p in prompts])


class Generation(BaseModel):
    prompt_tokens: list[str]
    generated: list[str]
    text: str
    token_probs: list[float] = Field(description="probability of each generated token")


@torch.no_grad()
def generate(
    session: RunSession, ids: list[int], *, max_new_tokens: int = 20, temperature: float = 0.0,
    seed: int = 0, forward: Forward | None = None,
) -> Generation:
    """Greedy (temperature 0) or sampled continuation from the target model (or from
    ``forward``, e.g. the target under an edit)."""
    model = forward or session.run.target.model
    tok = session.tok
    limit = session.max_len or (len(ids) + max_new_tokens)
    out = list(ids)
    probs: list[float] = []
    g = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(max_new_tokens):
        if len(out) >= limit:
            break
        logits = model(session.ids_tensor(out))[0, -1].float()  # (V,)
        p = F.softmax(logits, -1)
        if temperature <= 0:
            nxt = int(p.argmax())
        else:
            q = F.softmax(logits / temperature, -1).cpu()
            nxt = int(torch.multinomial(q, 1, generator=g))
        probs.append(round(float(p[nxt]), 5))
        out.append(nxt)
        if nxt == tok.eos_id:
            break
    new = out[len(ids):]
    return Generation(prompt_tokens=session.tokens(ids), generated=session.tokens(new),
                      text=tok.decode(out), token_probs=probs)


__all__ = ["AnalysisError", "Batch", "Generation", "dataset_texts", "document_batches",
           "documents", "encode_document", "generate", "pad", "prompt_batch"]
