"""The attribution stage on disk (DESIGN §4, §7) and its reader.

$SPD_MCP_HOME/runs/<run_id>/attributions/<config_hash>/
    manifest.json               run id, config, hash, n_tokens, layers / offsets, created, ...
    attributions.safetensors    the raw sums and counts of :class:`AttributionSums`
    DONE                        readers ignore a stage without it

A stage is written into a temporary sibling directory (DONE last) and renamed into place; a
finished stage is never rewritten.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file
from torch import Tensor

from spd_mcp.files import fsync_file, fsync_write
from spd_mcp.model.run_io import run_id_of
from spd_mcp.paths import run_data_dir

from .compute import COUNT_TENSORS, SUM_TENSORS, AttributionSums
from .config import AttributionConfig, AttributionError

DONE, MANIFEST, TENSORS = "DONE", "manifest.json", "attributions.safetensors"


class AttributionsNotFound(AttributionError):
    """No finished attribution stage for the run (or the requested config hash)."""


class AttributionManifest(BaseModel):
    format: int
    run_id: str
    config: AttributionConfig
    config_hash: str
    n_tokens: int = Field(description="valid (non-pad) tokens summed over")
    n_docs: int
    created: str
    code_version: str
    seconds: float = Field(description="wall time of the computation")
    layers: list[str] = Field(description="canonical decomposed layers in forward order")
    offsets: list[int] = Field(description="layer l's components are offsets[l]..offsets[l+1]-1")
    vocab_size: int
    tensors: dict[str, list[int]] = Field(description="stored array name -> shape")
    stored: str = Field(
        "signed raw sums (fp64) over documents, target positions and source positions; "
        "component sources weighted by a·ci, token sources by grad·embedding; no |.| sums",
        description="what the sums are",
    )


@dataclass
class Attributions:
    """A finished attribution stage, loaded (tensors on the CPU)."""

    path: Path
    manifest: AttributionManifest
    sums: AttributionSums

    @property
    def config_hash(self) -> str:
        return self.manifest.config_hash

    @property
    def layers(self) -> list[str]:
        return self.manifest.layers

    @property
    def offsets(self) -> list[int]:
        return self.manifest.offsets

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def n_components(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, name: str) -> Tensor:
        return self.sums.tensors[name]

    @cached_property
    def component_totals(self) -> Tensor:
        """(S,) Σ |attribution| into each component from every source (components, tokens)."""
        return self["comp_comp"].abs().sum(0) + self["token_comp"].abs().sum(0)

    @cached_property
    def output_totals(self) -> Tensor:
        """(V,) Σ |attribution| into each output token from every source."""
        return self["comp_output"].abs().sum(0) + self["token_output"].abs().sum(0)


# ---------------------------------------------------------------------------------- paths
def attributions_root(run_id: str) -> Path:
    return run_data_dir(run_id) / "attributions"


def stage_dir(run_id: str, chash: str) -> Path:
    return attributions_root(run_id) / chash


def is_done(path: Path) -> bool:
    return (path / DONE).exists()


# ------------------------------------------------------------------------------- writing
def write_stage(out: Path, manifest: AttributionManifest, sums: AttributionSums) -> bool:
    """Write the stage atomically; False if a finished stage appeared there meanwhile."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in sums.tensors.items()},
                  str(tmp / TENSORS))
        fsync_file(tmp / TENSORS)
        fsync_write(tmp / MANIFEST, manifest.model_dump_json(indent=2) + "\n")
        fsync_write(tmp / DONE, "")
        if out.exists():
            if is_done(out):
                return False
            shutil.rmtree(out)  # a stale, unfinished stage (never renamed into place by us)
        try:
            os.replace(tmp, out)
        except OSError:
            if is_done(out):  # a concurrent writer finished first
                return False
            raise
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------- reading
def read_stage(path: Path) -> Attributions:
    if not is_done(path):
        raise AttributionsNotFound(f"{path} is not a finished attribution stage (no DONE marker)")
    manifest = AttributionManifest.model_validate_json((path / MANIFEST).read_text())
    tensors = load_file(str(path / TENSORS))
    missing = [k for k in (*SUM_TENSORS, *COUNT_TENSORS) if k not in tensors]
    if missing:
        raise AttributionError(f"{path / TENSORS} lacks arrays {missing}; recompute the stage")
    sums = AttributionSums(manifest.layers, manifest.offsets, manifest.vocab_size,
                           {k: tensors[k] for k in (*SUM_TENSORS, *COUNT_TENSORS)},
                           manifest.n_tokens, manifest.n_docs)
    return Attributions(path, manifest, sums)


def list_attributions(run: Any) -> list[AttributionManifest]:
    """Finished attribution stages of a run, newest first."""
    root = attributions_root(run_id_of(run))
    out = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and not d.name.startswith(".") and is_done(d):
                try:
                    out.append(AttributionManifest.model_validate_json((d / MANIFEST).read_text()))
                except (OSError, ValueError):
                    continue
    return sorted(out, key=lambda m: m.created, reverse=True)


def load_attributions(run: Any, config_hash: str | None = None, *, missing_ok: bool = False
                      ) -> Attributions | None:
    """The newest finished stage of ``run`` (RunSession, LoadedRun or name/path), or the one
    with ``config_hash``. Raises :class:`AttributionsNotFound` (None with ``missing_ok``)."""
    run_id = run_id_of(run)
    if config_hash is not None:
        path: Path | None = stage_dir(run_id, config_hash)
        if path is not None and not is_done(path):
            path = None
    else:
        found = list_attributions(run)
        path = stage_dir(run_id, found[0].config_hash) if found else None
    if path is None:
        if missing_ok:
            return None
        what = f"with config hash {config_hash!r} " if config_hash else ""
        have = [m.config_hash for m in list_attributions(run)]
        raise AttributionsNotFound(
            f"no finished dataset attributions {what}for run {run_id!r} under "
            f"{attributions_root(run_id)}" + (f" (available: {have})" if have else "")
            + "; compute them with `spd-mcp attributions <run>`"
        )
    return read_stage(path)


def tensor_shapes(sums: AttributionSums) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in sums.tensors.items()}
