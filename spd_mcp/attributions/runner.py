"""Compute a run's dataset attributions into its stage directory (reused when finished).

Documents: doc ``i`` is ``entry.dataset_text(i)`` tokenised (BOS first) and truncated to the
model context; docs 0, 1, 2, … are read until ``n_tokens`` tokens are covered (whole documents,
so at most one document's worth more). The documents are batched in order of length (stable),
``batch_size`` per batch and right-padded, which wastes little on padding; the sums do not
depend on the batching beyond float rounding.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Literal

import torch
from pydantic import BaseModel

from spd_mcp.model.session import RunSession
from spd_mcp.model.text import encode_document
from spd_mcp.paths import package_version

from .compute import Accumulator, Batch
from .config import ATTRIBUTIONS_FORMAT, AttributionConfig, AttributionError, config_hash
from .store import AttributionManifest, is_done, stage_dir, tensor_shapes, write_stage

ProgressFn = Callable[[int, int], None]
"""``progress(tokens_done, tokens_total)`` after every batch."""


class AttributionOutcome(BaseModel):
    status: Literal["computed", "already computed"]
    run_id: str
    config_hash: str
    path: str
    n_tokens: int
    seconds: float
    message: str


def encode_doc(session: RunSession, index: int) -> list[int]:
    """Document ``index`` of the run's dataset: token ids (BOS first), truncated to context."""
    if not session.is_language_model:
        raise AttributionError(
            f"run {session.run.name!r} has no text dataset (not a language model); dataset "
            "attributions need a language-model run such as 'tales'"
        )
    return encode_document(session, session.require_lm().dataset_text(index))


def sample_docs(session: RunSession, n_tokens: int) -> list[list[int]]:
    """Docs 0, 1, 2, … until ``n_tokens`` tokens are covered (or every document is read)."""
    docs: list[list[int]] = []
    total = 0
    limit = session.require_lm().n_documents("train") if session.is_language_model else None
    while total < n_tokens and (limit is None or len(docs) < limit):
        doc = encode_doc(session, len(docs))
        if not doc:
            raise AttributionError(f"document {len(docs)} of run {session.run.name!r} is empty")
        docs.append(doc)
        total += len(doc)
    return docs


def make_batches(docs: list[list[int]], batch_size: int, pad_id: int,
                 device: torch.device | str = "cpu") -> Iterator[Batch]:
    """Right-padded (ids (B, T), lengths (B,)) batches of the docs in order of length."""
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))
    for b0 in range(0, len(order), batch_size):
        rows = [docs[i] for i in order[b0:b0 + batch_size]]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        yield ids.to(device), lengths.to(device)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def compute_attributions(session: RunSession, config: AttributionConfig | None = None, *,
                         progress: ProgressFn | None = None, chunk: int = 16,
                         ) -> AttributionOutcome:
    """Compute the stage of ``config`` for the session's run, or reuse a finished one."""
    config = config or AttributionConfig()
    run_id = str(session.run.meta["run_id"])
    chash = config_hash(run_id, config)
    out = stage_dir(run_id, chash)
    if is_done(out):
        return AttributionOutcome(status="already computed", run_id=run_id, config_hash=chash,
                                  path=str(out), n_tokens=0, seconds=0.0,
                                  message=f"already computed: {out}")
    t0 = time.perf_counter()
    docs = sample_docs(session, config.n_tokens)
    total = sum(len(d) for d in docs)
    acc = Accumulator(session.cm, session.topology, chunk=chunk)
    done = 0
    if progress is not None:
        progress(0, total)
    for ids, lengths in make_batches(docs, config.batch_size, session.tokenizer.pad_id,
                                     session.device):
        done += acc.add(ids, lengths)
        if progress is not None:
            progress(done, total)
    sums = acc.result()
    seconds = time.perf_counter() - t0
    manifest = AttributionManifest(
        format=ATTRIBUTIONS_FORMAT, run_id=run_id, config=config, config_hash=chash,
        n_tokens=sums.n_tokens, n_docs=sums.n_docs, created=_now(),
        code_version=package_version(), seconds=round(seconds, 3), layers=sums.layers,
        offsets=sums.offsets, vocab_size=sums.vocab_size, tensors=tensor_shapes(sums),
    )
    if not write_stage(out, manifest, sums):
        return AttributionOutcome(status="already computed", run_id=run_id, config_hash=chash,
                                  path=str(out), n_tokens=0, seconds=seconds,
                                  message=f"already computed (concurrently): {out}")
    return AttributionOutcome(
        status="computed", run_id=run_id, config_hash=chash, path=str(out),
        n_tokens=sums.n_tokens, seconds=seconds,
        message=f"computed dataset attributions over {sums.n_tokens:,} tokens "
                f"({sums.n_docs} docs) in {seconds:.1f}s: {out}",
    )
