"""The run directory (DESIGN §4): atomic save, offline load, resolution by path or name.

<run>/run.json              schema version, run id, target spec, config, created_at, code version,
                            metrics summary
<run>/target.safetensors    target weights
<run>/components.safetensors  U, V, CI-function parameters
<run>/tokenizer.json        (language models)
<run>/metrics.jsonl         training curve
<run>/DONE                  written last; a directory without it is not a run
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spd_mcp.errors import InputError
from spd_mcp.files import fsync_write, publish_dir
from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.config import DecomposeConfig
from spd_mcp.model.targets import ResolvedTarget, load_state_strict, resolve_target
from spd_mcp.paths import package_version, runs_dir, shipped_runs_dir

SCHEMA_VERSION = 1
RUN_FILE, TARGET_FILE, COMPONENTS_FILE, METRICS_FILE, DONE_FILE, MANIFEST_FILE = (
    "run.json",
    "target.safetensors",
    "components.safetensors",
    "metrics.jsonl",
    "DONE",
    "manifest.json",
)


class RunError(InputError):
    """A run cannot be found, is incomplete, or does not match the code."""


def _tensors(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage: store independent contiguous CPU copies.
    state = module.state_dict()
    return {prefix + k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def component_state(cm: ComponentModel) -> dict[str, torch.Tensor]:
    return {
        **_tensors(cm.components, "components."),
        **_tensors(cm.ci_fns, "ci_fns."),
    }


def save_run(
    out: Path,
    *,
    config: DecomposeConfig,
    cm: ComponentModel,
    metrics: list[dict[str, Any]],
    summary: dict[str, Any],
    extras: Callable[[Path], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a run to a temporary sibling directory, then rename it into place."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise RunError(f"{out} already exists (use --overwrite to replace it)")
    with publish_dir(out) as tmp:
        save_file(_tensors(cm.target), str(tmp / TARGET_FILE))
        save_file(component_state(cm), str(tmp / COMPONENTS_FILE))
        fsync_write(tmp / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in metrics))
        if extras is not None:
            extras(tmp)
        meta = {
            "schema_version": SCHEMA_VERSION,
            "run_id": f"{config.name}-{uuid.uuid4().hex[:8]}",
            "name": config.name,
            "target": config.target.model_dump(mode="json"),
            "config": config.model_dump(mode="json"),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "code_version": package_version(),
            "layers": {n: {"C": C, "kind": cm.component(n).kind} for n, C in cm.Cs.items()},
            "summary": summary,
        }
        fsync_write(tmp / RUN_FILE, json.dumps(meta, indent=2) + "\n")
        fsync_write(tmp / DONE_FILE, "")
    return out


def resolve_run(ref: str | Path) -> Path:
    """A run by path, by name under $SPD_MCP_HOME/runs, or a run shipped in the package."""
    p = Path(ref)
    candidates = [p] if (p.is_absolute() or os.sep in str(ref) or p.exists()) else []
    if not candidates:
        candidates = [runs_dir() / str(ref), shipped_runs_dir() / str(ref)]
    for c in candidates:
        if (c / RUN_FILE).is_file() or (c / DONE_FILE).exists():
            if not (c / DONE_FILE).exists():
                raise RunError(f"{c} is incomplete (no DONE marker): it was not finished")
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise RunError(f"run {str(ref)!r} not found (looked in {tried}); see `spd-mcp runs`")


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_manifest(run_dir: Path) -> None:
    """Check every file listed in ``manifest.json`` against its sha256 (shipped runs have one)."""
    path = run_dir / MANIFEST_FILE
    if not path.exists():
        return
    listed = json.loads(path.read_text())["sha256"]
    bad = sorted(
        name for name, digest in listed.items()
        if not (run_dir / name).is_file() or _sha256(run_dir / name) != digest
    )
    if bad:
        raise RunError(f"{run_dir}: checksum mismatch or missing file for {bad}; reinstall the run")


def ship_run(src: Path, dst: Path) -> Path:
    """Copy a finished run (sub-directories such as ``hf/`` included) to ``dst`` (e.g. inside
    the package) with a sha256 manifest of every file."""
    src = resolve_run(src)
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*")
                   if p.is_file() and p.name != MANIFEST_FILE and "__pycache__" not in p.parts)
    with publish_dir(dst) as tmp:
        for name in files:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, tmp / name)
        manifest = {"sha256": {n: _sha256(tmp / n) for n in files if n != DONE_FILE}}
        fsync_write(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return dst


def read_meta(run_dir: Path) -> dict[str, Any]:
    meta = json.loads((run_dir / RUN_FILE).read_text())
    v = meta.get("schema_version")
    if v != SCHEMA_VERSION:
        raise RunError(f"{run_dir}: schema version {v}, this code reads {SCHEMA_VERSION}")
    return meta


def run_id_of(run: Any) -> str:
    """Run id of a RunSession, a LoadedRun, or a run reference (name / path)."""
    if isinstance(run, LoadedRun):
        return run.run_id
    if isinstance(getattr(run, "run", None), LoadedRun):
        return str(run.run.run_id)
    meta = read_meta(resolve_run(run))
    return str(meta.get("run_id", meta["name"]))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line
    return rows


@dataclass
class LoadedRun:
    path: Path
    meta: dict[str, Any]
    config: DecomposeConfig
    target: ResolvedTarget
    model: ComponentModel

    @property
    def name(self) -> str:
        return str(self.meta["name"])

    @property
    def run_id(self) -> str:
        """The run's id (derived data lives under ``$SPD_MCP_HOME/runs/<run_id>``)."""
        return str(self.meta.get("run_id", self.name))


def load_run(ref: str | Path, *, device: str = "cpu") -> LoadedRun:
    """Load a finished run with no network; every key and shape is checked."""
    run_dir = resolve_run(ref)
    verify_manifest(run_dir)
    meta = read_meta(run_dir)
    config = DecomposeConfig.model_validate(meta["config"])
    target = resolve_target(config.target, weights=run_dir / TARGET_FILE, run_dir=run_dir,
                            data=config.data)
    cm = ComponentModel(target.model, config.modules, config.ci_fn, target.aliases())
    state = load_file(str(run_dir / COMPONENTS_FILE))
    load_state_strict(_StateView(cm), state, source=str(run_dir / COMPONENTS_FILE))
    cm.to(device).eval()
    return LoadedRun(run_dir, meta, config, target, cm)


class _StateView(nn.Module):
    """Presents a ComponentModel's saved parts as one module for strict key checking."""

    def __init__(self, cm: ComponentModel) -> None:
        super().__init__()
        self.components = cm.components
        self.ci_fns = cm.ci_fns


def list_runs() -> list[tuple[str, Path]]:
    """(name, path) for runs under $SPD_MCP_HOME/runs and those shipped with the package."""
    found = []
    for base in (runs_dir(), shipped_runs_dir()):
        if base.is_dir():
            for d in sorted(base.iterdir()):
                if (d / DONE_FILE).exists() and (d / RUN_FILE).exists():
                    found.append((d.name, d))
    return found
