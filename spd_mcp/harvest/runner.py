"""Run a harvest (whole or one shard) with checkpoints, and merge shards into the stage.

A shard writes its statistics, examples and co-firing log; the merge sums the statistics, keeps
the smallest example keys and counts co-firing from every shard's log (``cofire.py``).
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from spd_mcp.errors import OperationError
from spd_mcp.files import write_json_atomic
from spd_mcp.model.run_io import LoadedRun, read_meta, resolve_run, run_id_of
from spd_mcp.model.session import RunSession
from spd_mcp.paths import package_version

from .accumulate import Accumulator, encode_doc, pad_batch
from .cofire import BLOCK_ROWS, FIRINGS, FiringLog, table_from_logs
from .config import (
    HARVEST_FORMAT,
    HarvestConfig,
    HarvestError,
    HarvestPlan,
    ShardSpec,
    config_hash,
    make_plan,
)
from .reservoir import Examples, keep_smallest, key_bits
from .store import (
    CHECKPOINT,
    PLAN,
    HarvestManifest,
    ShardPlanInfo,
    is_done,
    read_plan,
    read_result,
    save_tensors_atomic,
    shards_dir,
    stage_dir,
    write_result,
)

ProgressFn = Callable[[int, int], None]
"""``progress(tokens_done, tokens_total)`` after every batch (resumed tokens count as done)."""


class HarvestInterrupted(OperationError):
    """Raised by the ``stop_after_batches`` test hook (simulates a kill)."""


class HarvestOutcome(BaseModel):
    status: Literal["harvested", "already harvested", "shard harvested",
                    "shard already harvested"]
    run_id: str
    config_hash: str
    path: str
    n_tokens: int
    message: str


def resolve_config(run: Any, config: HarvestConfig | None = None) -> tuple[str, HarvestConfig]:
    """(run id, config with the run's alive threshold filled in)."""
    config = config or HarvestConfig()
    if isinstance(run, RunSession):
        meta = run.run.meta
    elif isinstance(run, LoadedRun):
        meta = run.meta
    else:
        meta = read_meta(resolve_run(run))
    alive = float(meta["config"].get("alive_threshold", 0.1))
    return run_id_of(run), config.resolved(alive)


def get_plan(session: RunSession, run_id: str, chash: str, config: HarvestConfig) -> HarvestPlan:
    """The cached plan of this stage, or compute and cache it."""
    plan = read_plan(run_id, chash)
    if plan is None:
        plan = make_plan(lambda i: len(encode_doc(session, i)), config.n_tokens,
                         config.batch_size, session.require_lm().n_documents("train"))
        stage = stage_dir(run_id, chash)
        stage.mkdir(parents=True, exist_ok=True)
        write_json_atomic(stage / PLAN, plan.model_dump(mode="json"))
    return plan


def _manifest(session: RunSession, run_id: str, chash: str, config: HarvestConfig,
              plan: HarvestPlan, n_shards: int, n_tokens: int, shard: str | None
              ) -> HarvestManifest:
    layers = session.layers
    offsets = [0]
    for layer in layers:
        offsets.append(offsets[-1] + session.keys.Cs[layer])
    return HarvestManifest(
        format=HARVEST_FORMAT, run_id=run_id, config=config, config_hash=chash,
        n_tokens=n_tokens, n_docs=plan.n_docs, created=_now(), code_version=package_version(),
        layers=layers, offsets=offsets, vocab_size=session.tokenizer.vocab_size,
        key_bits=key_bits(offsets[-1]),
        plan=ShardPlanInfo(n_shards=n_shards, n_batches=plan.n_batches,
                           batch_size=plan.batch_size, n_docs=plan.n_docs),
        shard=shard,
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass
class _Batch:
    index: int  # global batch index
    ids: Tensor
    lengths: Tensor
    docs: Tensor
    last_doc: int
    tokens: int


def _planned(session: RunSession, plan: HarvestPlan, batches: list[int]) -> Iterator[_Batch]:
    for j in batches:
        docs = list(plan.batch_docs(j))
        rows = [encode_doc(session, d) for d in docs]
        yield _Batch(j, *pad_batch(session, rows, docs), docs[-1], sum(map(len, rows)))


def _streamed(session: RunSession, config: HarvestConfig, start: int, tokens: int
              ) -> Iterator[_Batch]:
    """The unsharded plan's batches from batch ``start`` on, without scanning ahead: a batch
    ends after batch_size documents or once ``n_tokens`` is reached (same as make_plan)."""
    B, j = config.batch_size, start
    d = j * B
    while tokens < config.n_tokens:
        rows, docs = [], []
        while len(rows) < B and tokens < config.n_tokens:
            rows.append(encode_doc(session, d))
            docs.append(d)
            tokens += len(rows[-1])
            d += 1
        yield _Batch(j, *pad_batch(session, rows, docs), docs[-1], sum(map(len, rows)))
        j += 1


def _prefetch(it: Iterator[_Batch], depth: int = 2) -> Iterator[_Batch]:
    """Produce the next batches (documents, tokenisation) in a thread while this one computes."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in it:
                if not put(item):
                    return
            put(end)
        except BaseException as err:  # surfaced in the consumer
            put(err)

    thread = threading.Thread(target=work, name="harvest-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def run_shard(
    session: RunSession, config: HarvestConfig | None = None, shard: ShardSpec | None = None, *,
    checkpoint_every: int = 50, progress: ProgressFn | None = None,
    stop_after_batches: int | None = None,
) -> HarvestOutcome:
    """Harvest one shard into ``shards/<i>-of-<n>/``, resuming from its checkpoint if any.

    A sharded run needs the plan (computed once and cached in the stage's ``plan.json``; a
    submitter of many shards should call :func:`prepare` first). The unsharded run (0 of 1)
    streams documents and writes the plan at the end.
    """
    shard = shard or ShardSpec(index=0, count=1)
    run_id, config = resolve_config(session, config)
    chash = config_hash(run_id, config)
    out = shards_dir(run_id, chash) / shard.name
    if is_done(stage_dir(run_id, chash)) or is_done(out):
        where = stage_dir(run_id, chash) if is_done(stage_dir(run_id, chash)) else out
        return HarvestOutcome(
            status="shard already harvested", run_id=run_id, config_hash=chash, path=str(where),
            n_tokens=0, message=f"already harvested: {where}",
        )
    plan = read_plan(run_id, chash)
    if plan is None and shard.count > 1:
        plan = get_plan(session, run_id, chash, config)
    ckpt, log_path = out / CHECKPOINT, out / FIRINGS
    meta: dict[str, str] = {}
    if ckpt.exists():
        with safe_open(str(ckpt), "pt") as f:
            meta = f.metadata() or {}
    # resume only a checkpoint of this shard whose co-firing log is still there (format 2)
    keep = int(meta.get("log_bytes", -1))
    if not (meta.get("config_hash") == chash and meta.get("shard") == shard.name
            and 0 <= keep <= (log_path.stat().st_size if log_path.exists() else -1)):
        meta, keep = {}, 0
    out.mkdir(parents=True, exist_ok=True)
    with FiringLog(log_path, keep) as log:
        acc = Accumulator(session, config, log)
        done, tokens, seen = 0, 0, []  # batches done, tokens done, tokens per batch done
        if meta:
            acc.load_state(load_file(str(ckpt)))
            done, seen = int(meta["batches_done"]), json.loads(meta["batch_tokens"])
            tokens = sum(seen)
        if plan is not None:
            mine = plan.shard_batches(shard)
            total, source = plan.shard_tokens(shard), _planned(session, plan, mine[done:])
        else:
            total, source = config.n_tokens, _streamed(session, config, done, tokens)
        if progress is not None:
            progress(tokens, total)
        last_doc = -1
        for n, batch in enumerate(_prefetch(source), start=done + 1):
            tokens += acc.process(batch.ids, batch.lengths, batch.docs)
            seen.append(batch.tokens)
            last_doc = batch.last_doc
            if progress is not None:
                progress(tokens, max(total, tokens))
            if n % checkpoint_every == 0:
                log.sync()
                save_tensors_atomic(ckpt, acc.state(), metadata={
                    "config_hash": chash, "shard": shard.name, "batches_done": str(n),
                    "batch_tokens": json.dumps(seen), "log_bytes": str(log.nbytes)})
            if stop_after_batches is not None and n - done >= stop_after_batches:
                raise HarvestInterrupted(f"stopped after {n} batches (test hook)")
    if plan is None:  # the streamed unsharded run: its batches are the plan
        plan = HarvestPlan(n_docs=last_doc + 1, n_tokens=tokens, batch_size=config.batch_size,
                           batch_tokens=seen)
        write_json_atomic(stage_dir(run_id, chash) / PLAN, plan.model_dump(mode="json"))
    manifest = _manifest(session, run_id, chash, config, plan, shard.count,
                         acc.stats.n_tokens, shard.name)
    write_result(out, manifest, acc.stats, acc.examples,
                 before_done=lambda: ckpt.unlink(missing_ok=True))
    return HarvestOutcome(
        status="shard harvested", run_id=run_id, config_hash=chash, path=str(out),
        n_tokens=acc.stats.n_tokens, message=f"harvested shard {shard.name}: {out}",
    )


def prepare(session: RunSession, config: HarvestConfig | None = None) -> HarvestPlan:
    """Compute and cache the plan (before launching many shards, e.g. a SLURM array)."""
    run_id, config = resolve_config(session, config)
    return get_plan(session, run_id, config_hash(run_id, config), config)


def _shard_counts(run_id: str, chash: str) -> dict[int, set[int]]:
    found: dict[int, set[int]] = {}
    d = shards_dir(run_id, chash)
    if d.is_dir():
        for p in d.iterdir():
            m = re.fullmatch(r"(\d+)-of-(\d+)", p.name)
            if m and is_done(p):
                found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    return found


def merge_shards(
    run: Any, config: HarvestConfig | None = None, n_shards: int | None = None, *,
    keep_shards: bool = False, device: torch.device | str = "cpu", block_rows: int = BLOCK_ROWS,
) -> HarvestOutcome:
    """Merge all ``n_shards`` finished shards into the stage (exactly the unsharded result).

    ``run``: a RunSession, LoadedRun or run name/path; the model is not needed. Co-firing is
    counted on ``device``, ``block_rows`` rows of the S x S table at a time.
    """
    run_id, config = resolve_config(run, config)
    chash = config_hash(run_id, config)
    stage = stage_dir(run_id, chash)
    if is_done(stage):
        return HarvestOutcome(status="already harvested", run_id=run_id, config_hash=chash,
                              path=str(stage), n_tokens=0, message=f"already harvested: {stage}")
    found = _shard_counts(run_id, chash)
    if n_shards is None:
        if not found:
            raise HarvestError(
                f"no finished shards for run {run_id!r}, config {chash} under "
                f"{shards_dir(run_id, chash)}; run `spd-mcp harvest RUN --shard i/n` first"
            )
        if len(found) > 1:
            raise HarvestError(f"shards of several shard counts {sorted(found)} exist; "
                               "pass the shard count (--shards N)")
        n_shards = next(iter(found))
    missing = sorted(set(range(n_shards)) - found.get(n_shards, set()))
    if missing:
        names = ", ".join(f"{i}/{n_shards}" for i in missing)
        raise HarvestError(
            f"cannot merge: {len(missing)} of {n_shards} shards are not finished ({names}); "
            f"run `spd-mcp harvest RUN --shard i/{n_shards}` for each"
        )
    stats, parts, first, logs = None, [], None, []
    for i in range(n_shards):
        path = shards_dir(run_id, chash) / ShardSpec(index=i, count=n_shards).name
        if not (path / FIRINGS).exists():
            raise HarvestError(f"shard {path.name} has no co-firing log {FIRINGS} (an older "
                               f"harvest format); delete {path.parent} and re-run its shards")
        m, s, ex = read_result(path)
        first = first or m
        stats = s if stats is None else stats + s
        parts.append(ex)
        logs.append(path / FIRINGS)
    assert stats is not None and first is not None
    stats.t.update(table_from_logs(logs, stats.t["fire_count"], block_rows=block_rows,
                                   device=device))
    examples = keep_smallest(Examples.cat(parts), config.n_examples, key_bits(stats.n_components))
    manifest = first.model_copy(update={"n_tokens": stats.n_tokens, "created": _now(),
                                        "shard": None})
    write_result(stage, manifest, stats, examples)
    if not keep_shards:
        shutil.rmtree(shards_dir(run_id, chash), ignore_errors=True)
    return HarvestOutcome(status="harvested", run_id=run_id, config_hash=chash, path=str(stage),
                          n_tokens=stats.n_tokens, message=f"harvested: {stage}")


def harvest(
    session: RunSession, config: HarvestConfig | None = None, *, checkpoint_every: int = 50,
    progress: ProgressFn | None = None, stop_after_batches: int | None = None,
) -> HarvestOutcome:
    """The whole harvest in this process (shard 0 of 1, then merge); a DONE stage is reused."""
    run_id, config = resolve_config(session, config)
    chash = config_hash(run_id, config)
    stage = stage_dir(run_id, chash)
    if is_done(stage):
        return HarvestOutcome(status="already harvested", run_id=run_id, config_hash=chash,
                              path=str(stage), n_tokens=0, message=f"already harvested: {stage}")
    run_shard(session, config, ShardSpec(index=0, count=1), checkpoint_every=checkpoint_every,
              progress=progress, stop_after_batches=stop_after_batches)
    return merge_shards(session, config, 1, device=session.device)


def stage_path(run: Any, config: HarvestConfig | None = None) -> Path:
    run_id, config = resolve_config(run, config)
    return stage_dir(run_id, config_hash(run_id, config))


__all__ = ["HarvestInterrupted", "HarvestOutcome", "harvest", "merge_shards", "prepare",
           "resolve_config", "run_shard", "stage_path"]
