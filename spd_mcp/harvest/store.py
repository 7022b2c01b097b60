"""The harvest stage on disk (DESIGN §4, §7) and its reader.

$SPD_MCP_HOME/runs/<run_id>/harvest/<config_hash>/
    plan.json                 the document / batch plan (cached for shards)
    manifest.json             run id, config, hash, n_tokens, created, code version, layers ...
    stats.safetensors         HarvestStats tensors (with the co-firing table, see cofire.py)
    examples.safetensors      Examples tensors
    DONE                      written last: readers ignore a stage without it
    shards/<i>-of-<n>/        a shard: firings.bin (its co-firing log) and, while running,
                              checkpoint.safetensors; when finished the same three files + DONE
                              (removed once the stage is merged)

Files are written to a temporary name (or directory) and renamed into place, fsynced, DONE last;
a finished stage or shard is never rewritten.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file

from spd_mcp.files import fsync_file, fsync_write, write_json_atomic
from spd_mcp.model.run_io import run_id_of
from spd_mcp.paths import run_data_dir

from .config import HarvestConfig, HarvestError, HarvestPlan
from .reservoir import Examples
from .stats import HarvestStats

DONE, MANIFEST, STATS, EXAMPLES, PLAN, CHECKPOINT = (
    "DONE", "manifest.json", "stats.safetensors", "examples.safetensors", "plan.json",
    "checkpoint.safetensors",
)


class HarvestNotFound(HarvestError):
    """No finished harvest for the run (or the requested config hash)."""


class ShardPlanInfo(BaseModel):
    n_shards: int
    n_batches: int
    batch_size: int
    n_docs: int
    sharding: str = "global batch j (docs j*B .. j*B+B-1) belongs to shard j % n_shards"


class HarvestManifest(BaseModel):
    format: int
    run_id: str
    config: HarvestConfig
    config_hash: str
    n_tokens: int
    n_docs: int
    created: str
    code_version: str
    layers: list[str]
    offsets: list[int] = Field(description="layer l's components are offsets[l]..offsets[l+1]-1")
    vocab_size: int
    key_bits: int = Field(description="example keys are uniform on [0, 2**key_bits)")
    plan: ShardPlanInfo
    shard: str | None = Field(None, description="'i-of-n' for a shard, None for the stage")


@dataclass
class Harvest:
    """A finished harvest stage, loaded."""

    path: Path
    manifest: HarvestManifest
    stats: HarvestStats
    examples: Examples

    @property
    def config_hash(self) -> str:
        return self.manifest.config_hash


# ---------------------------------------------------------------------------------- paths
def harvest_root(run_id: str) -> Path:
    return run_data_dir(run_id) / "harvest"


def stage_dir(run_id: str, chash: str) -> Path:
    return harvest_root(run_id) / chash


def shards_dir(run_id: str, chash: str) -> Path:
    return stage_dir(run_id, chash) / "shards"


def is_done(path: Path) -> bool:
    return (path / DONE).exists()


# ------------------------------------------------------------------------------- writing
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # safetensors writes 0600; shared stages should be readable


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata)
        os.chmod(tmp, _FILE_MODE)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_result(out: Path, manifest: HarvestManifest, stats: HarvestStats,
                 examples: Examples, *, before_done: Callable[[], None] | None = None) -> None:
    """Write manifest + stats + examples into ``out`` via a temp directory, then DONE."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_tensors_atomic(tmp / STATS, stats.tensors())
        save_tensors_atomic(tmp / EXAMPLES, examples.tensors())
        write_json_atomic(tmp / MANIFEST, manifest.model_dump(mode="json"))
        for name in (STATS, EXAMPLES, MANIFEST):
            os.replace(tmp / name, out / name)
        if before_done is not None:
            before_done()
        fsync_write(out / DONE, "")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------- reading
def read_result(path: Path) -> tuple[HarvestManifest, HarvestStats, Examples]:
    if not is_done(path):
        raise HarvestNotFound(f"{path} is not a finished harvest (no DONE marker)")
    manifest = HarvestManifest.model_validate_json((path / MANIFEST).read_text())
    stats = HarvestStats.from_tensors(
        load_file(str(path / STATS)), manifest.layers, manifest.offsets, manifest.vocab_size
    )
    return manifest, stats, Examples.from_tensors(load_file(str(path / EXAMPLES)))


def read_plan(run_id: str, chash: str) -> HarvestPlan | None:
    p = stage_dir(run_id, chash) / PLAN
    return HarvestPlan.model_validate_json(p.read_text()) if p.exists() else None


def list_harvests(run: Any) -> list[HarvestManifest]:
    """Finished harvest stages of a run, newest first."""
    root = harvest_root(run_id_of(run))
    out = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and is_done(d):
                try:
                    out.append(HarvestManifest.model_validate_json((d / MANIFEST).read_text()))
                except (OSError, ValueError):
                    continue
    return sorted(out, key=lambda m: m.created, reverse=True)


def find_harvest(run: Any, config_hash: str | None = None) -> Path | None:
    """The newest finished stage (or the one with ``config_hash``), or None."""
    run_id = run_id_of(run)
    if config_hash is not None:
        p = stage_dir(run_id, config_hash)
        return p if is_done(p) else None
    found = list_harvests(run)
    return stage_dir(run_id, found[0].config_hash) if found else None


def load_harvest(run: Any, config_hash: str | None = None, *, missing_ok: bool = False
                 ) -> Harvest | None:
    """Load the newest finished harvest of ``run`` (RunSession, LoadedRun or name/path).

    Raises :class:`HarvestNotFound` (or returns None with ``missing_ok``) when there is none.
    """
    path = find_harvest(run, config_hash)
    if path is None:
        if missing_ok:
            return None
        run_id = run_id_of(run)
        what = f"with config hash {config_hash!r} " if config_hash else ""
        have = [m.config_hash for m in list_harvests(run)]
        raise HarvestNotFound(
            f"no finished harvest {what}for run {run_id!r} under {harvest_root(run_id)}"
            + (f" (available: {have})" if have else "")
            + "; build one with `spd-mcp harvest <run>`"
        )
    manifest, stats, examples = read_result(path)
    return Harvest(path, manifest, stats, examples)
