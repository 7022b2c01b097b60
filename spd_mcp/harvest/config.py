"""Harvest configuration, its hash, and the deterministic document / batch / shard plan.

Documents: doc ``i`` is ``entry.dataset_text(i)`` tokenised (BOS first, like ``RunSession.encode``)
and truncated to the model context. A harvest of ``n_tokens`` reads docs ``0 .. n_docs-1`` where
``n_docs`` is the smallest count whose tokens reach ``n_tokens`` (so it reads at least
``n_tokens``, overshooting by less than one document).

Batches: global batch ``j`` holds docs ``[j*B, (j+1)*B)``. Shard ``i`` of ``n`` processes the
global batches with ``j % n == i``. Sharding by batch (not by document) keeps every document in
the same batch — hence bit-identical forward passes — whether or not the harvest is sharded, so
merged shards equal the unsharded harvest exactly (CI values near the firing threshold could
otherwise flip with a different batch composition). The unsharded run streams documents and
records its batches as the plan; shards need the plan up front (one length scan, cached in
the stage's plan.json — compute it once with ``runner.prepare`` before launching many).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from spd_mcp.errors import InputError

HARVEST_FORMAT = 2
"""Stored layout (manifest ``format``): 2 keeps co-firing as a per-component table and shards
keep a firing log; format-1 stages (a dense S x S matrix) still load, converted on reading."""
RESULTS_VERSION = 1
"""What a harvest computes, in its config hash: format 2 serves format 1's answers exactly, so
stages and the labels that cite their hashes stay valid."""


class HarvestError(InputError):
    """A harvest cannot be run, found or merged; the message says why and what to do."""


class HarvestConfig(BaseModel):
    """What a harvest computes. ``fire_threshold=None`` means the run's ``alive_threshold``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_tokens: int = Field(200_000, gt=0, description="tokens to read (whole documents)")
    batch_size: int = Field(32, gt=0, description="documents per batch")
    fire_threshold: float | None = Field(
        None, ge=0.0, lt=1.0, description="a component fires where CI > this"
    )
    window: int = Field(8, ge=0, description="tokens each side of the firing token in examples")
    n_examples: int = Field(30, gt=0, description="activation examples kept per component")
    seed: int = Field(0, ge=0, description="seed of the example sampler")

    @property
    def window_len(self) -> int:
        return 2 * self.window + 1

    def resolved(self, alive_threshold: float) -> HarvestConfig:
        if self.fire_threshold is not None:
            return self
        return self.model_copy(update={"fire_threshold": float(alive_threshold)})


def config_hash(run_id: str, config: HarvestConfig) -> str:
    """Short sha256 of the canonical JSON of (results version, run id, resolved config)."""
    if config.fire_threshold is None:
        raise HarvestError("resolve the config (fire_threshold) before hashing it")
    payload = {"format": RESULTS_VERSION, "run_id": run_id,
               "config": config.model_dump(mode="json")}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ShardSpec(BaseModel):
    """Shard ``index`` of ``count`` (0-based, SLURM-array friendly)."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(ge=0)
    count: int = Field(ge=1)

    @classmethod
    def parse(cls, text: str) -> ShardSpec:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if m is None:
            raise HarvestError(f"--shard must look like i/n (e.g. 0/4), got {text!r}")
        i, n = int(m.group(1)), int(m.group(2))
        if n < 1 or not 0 <= i < n:
            raise HarvestError(
                f"--shard {text!r}: need n >= 1 and 0 <= i < n (shards are 0-based: 0/{max(n, 1)}"
                f" .. {max(n, 1) - 1}/{max(n, 1)})"
            )
        return cls(index=i, count=n)

    @property
    def name(self) -> str:
        return f"{self.index}-of-{self.count}"


class HarvestPlan(BaseModel):
    """Which documents and batches a harvest reads (deterministic given run and config)."""

    n_docs: int
    n_tokens: int = Field(description="tokens actually read (>= the configured n_tokens)")
    batch_size: int
    batch_tokens: list[int] = Field(description="tokens in each global batch")

    @property
    def n_batches(self) -> int:
        return len(self.batch_tokens)

    def batch_docs(self, j: int) -> range:
        return range(j * self.batch_size, min((j + 1) * self.batch_size, self.n_docs))

    def shard_batches(self, shard: ShardSpec) -> list[int]:
        return list(range(shard.index, self.n_batches, shard.count))

    def shard_tokens(self, shard: ShardSpec) -> int:
        return sum(self.batch_tokens[j] for j in self.shard_batches(shard))


def make_plan(doc_len: Callable[[int], int], n_tokens: int, batch_size: int,
              max_docs: int | None = None) -> HarvestPlan:
    """Scan document lengths until ``n_tokens`` tokens are covered (or ``max_docs`` documents,
    all a finite text source has, are read)."""
    total, n_docs, batch_tokens = 0, 0, []
    while total < n_tokens and (max_docs is None or n_docs < max_docs):
        length = doc_len(n_docs)
        if n_docs % batch_size == 0:
            batch_tokens.append(0)
        batch_tokens[-1] += length
        total += length
        n_docs += 1
    return HarvestPlan(
        n_docs=n_docs, n_tokens=total, batch_size=batch_size, batch_tokens=batch_tokens
    )
