"""A bounded, indexed sample of a run's dataset for fast phrase search.

Built once from ``entry.dataset_texts(n)`` (language-model zoo entries): every document is
tokenised into one flat id array with document offsets, and a posting list per token id gives
the positions where it occurs. A phrase query intersects positions with vectorised numpy ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field

from spd_mcp.errors import AnalysisError
from spd_mcp.model.session import RunSession
from spd_mcp.model.text import dataset_texts


class DatasetMatch(BaseModel):
    doc: int
    pos: int = Field(description="token position of the first matched word (BOS is position 0)")
    context: str = Field(description="the match in [[ ]] with words around it")


class DatasetSearchResult(BaseModel):
    query: str
    n_docs: int
    total_matches: int
    matches: list[DatasetMatch]
    next_offset: int | None = Field(None, description="pass as offset for the next page")


@dataclass
class DatasetIndex:
    ids: np.ndarray  # (N,) all tokens of all documents, BOS-prefixed
    doc_start: np.ndarray  # (D + 1,) offsets into ids
    postings: dict[int, np.ndarray]

    @classmethod
    def build(cls, session: RunSession, n_docs: int) -> DatasetIndex:
        if not session.is_language_model:
            raise AnalysisError(f"run {session.run.name!r} has no text dataset to search")
        docs = [session.tok.encode(t) for t in dataset_texts(session, n_docs)]
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        doc_start = np.concatenate([[0], np.cumsum(lengths)])
        ids = np.fromiter((i for d in docs for i in d), dtype=np.int64, count=int(lengths.sum()))
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        uniq, first = np.unique(sorted_ids, return_index=True)
        bounds = np.append(first, len(ids))
        postings = {int(t): order[bounds[i] : bounds[i + 1]] for i, t in enumerate(uniq)}
        return cls(ids, doc_start, postings)

    @property
    def n_docs(self) -> int:
        return len(self.doc_start) - 1

    def search(
        self, session: RunSession, query: str, *, offset: int = 0, limit: int = 20,
        window: int = 8,
    ) -> DatasetSearchResult:
        if not query.split():
            raise AnalysisError("query is empty; give one or more words")
        phrases = session.phrase_ids(query)
        found = [self._find(q) for q in phrases]
        starts = np.concatenate([f[0] for f in found])
        doc_of = np.concatenate([f[1] for f in found])
        length = np.concatenate([np.full(len(f[0]), n) for f, n in
                                 zip(found, [len(q) for q in phrases], strict=True)])
        order = np.argsort(starts, kind="stable")
        starts, doc_of, length = starts[order], doc_of[order], length[order]
        total = len(starts)
        page = slice(offset, offset + limit)
        matches = []
        for s, d, n in zip(starts[page].tolist(), doc_of[page].tolist(), length[page].tolist(),
                           strict=True):
            lo = max(int(self.doc_start[d]), s - window)
            hi = min(int(self.doc_start[d + 1]), s + n + window)
            left = session.join_tokens(session.tokens(self.ids[lo:s].tolist()))
            mid = session.join_tokens(session.tokens(self.ids[s : s + n].tolist()))
            right = session.join_tokens(session.tokens(self.ids[s + n : hi].tolist()))
            context = f"{left} [[ {mid} ]] {right}".strip()
            matches.append(DatasetMatch(doc=d, pos=s - int(self.doc_start[d]), context=context))
        nxt = offset + limit if offset + limit < total else None
        return DatasetSearchResult(
            query=query, n_docs=self.n_docs, total_matches=total, matches=matches, next_offset=nxt
        )

    def _find(self, q: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(start offsets, document) of every occurrence of the id sequence ``q``."""
        starts = self.postings.get(q[0], np.empty(0, dtype=np.int64))
        doc_of = np.searchsorted(self.doc_start, starts, side="right") - 1
        end_ok = starts + len(q) <= self.doc_start[doc_of + 1]
        starts, doc_of = starts[end_ok], doc_of[end_ok]
        for k, tok in enumerate(q[1:], start=1):
            hit = self.ids[starts + k] == tok
            starts, doc_of = starts[hit], doc_of[hit]
        return starts, doc_of

    def document(self, session: RunSession, doc: int) -> list[int]:
        if not 0 <= doc < self.n_docs:
            raise AnalysisError(f"doc {doc} out of range (0..{self.n_docs - 1})")
        return self.ids[self.doc_start[doc] : self.doc_start[doc + 1]].tolist()
