"""Text batches for editing: objective prompts, KL-penalty text and held-out measurement text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .session import AnalysisError, RunSession

TextSource = Literal["train", "heldout"]
HELDOUT_OFFSET = 1_000_000
"""Where no held-out stream exists, held-out documents are taken this far into the dataset."""


@dataclass
class Batch:
    """Right-padded ids (B, T) with a mask of real tokens and each row's last real position."""

    ids: Tensor
    mask: Tensor
    last: Tensor  # (B,)


def pad(session: RunSession, rows: Sequence[Sequence[int]]) -> Batch:
    pad_id = session.tokenizer.pad_id
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
    target nor the decomposition saw (the run's held-out stream, or far into the dataset)."""
    session.require_lm()
    entry = session.run.target.entry
    get = getattr(entry, "dataset_text", None)
    if get is None:
        raise AnalysisError(f"run {session.run.name!r} has no text dataset")
    if source == "heldout":
        held = getattr(entry, "heldout_text", None)
        if held is not None:
            return [held(offset + i) for i in range(n)]
        offset += HELDOUT_OFFSET
    return [get(offset + i) for i in range(n)]


def document_batches(session: RunSession, texts: Sequence[str], batch_size: int) -> list[Batch]:
    """Documents (cut to the context) in right-padded batches of ``batch_size``."""
    limit = session.max_len or None
    rows = [session.tokenizer.encode(t)[:limit] for t in texts]
    return [pad(session, rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def prompt_batch(session: RunSession, prompts: Sequence[str]) -> Batch:
    """Prompts encoded with validation (unknown words are errors naming them)."""
    return pad(session, [session.encode(p) for p in prompts])
