"""Baking an edit into plain target weights, and the standalone checkpoint it exports.

Baking adds an edit's rank-1 changes (and dense changes) to the decomposed weight matrices, so
the exported target computes the edited model with no SPD machinery. CI-gated edits depend on the
input and cannot be baked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from spd_mcp.errors import AnalysisError
from spd_mcp.files import fsync_write, publish_dir
from spd_mcp.model.session import RunSession

from .edit import Edit, layer_plans


def weight_changes(session: RunSession, edit: Edit) -> dict[str, Tensor]:
    """Module path → additive change of its weight (target layout) that bakes the edit."""
    if edit.gated:
        gated = [str(s.key) for s in edit.scales if s.ci_threshold is not None]
        raise AnalysisError(
            f"cannot bake a CI-gated edit ({', '.join(gated[:5])}): its effect depends on the "
            "input. Bake the ungated edit (ci_threshold=None) or apply it at runtime")
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for m, p in layer_plans(session, edit).items():
            comp = p.comp
            VU = torch.zeros(comp.d_in, comp.d_out, device=session.device)
            if p.scale_V is not None:
                assert p.factor is not None and p.scale_U is not None
                VU += (p.scale_V * p.factor) @ p.scale_U
            if p.adapter is not None:
                assert p.old_V is not None and p.old_U is not None
                VU += p.adapter.V.detach() @ p.adapter.U.detach() - p.old_V @ p.old_U
            change = comp.target_shaped(VU)
            if p.dense is not None:
                change = change + p.dense.detach()
            out[m] = change
    return out


def baked_target_state(session: RunSession, edit: Edit) -> dict[str, Tensor]:
    """The target's state dict with the edit baked into its weights (CPU copies)."""
    changes = weight_changes(session, edit)
    state = {k: v.detach().clone() for k, v in session.cm.target.state_dict().items()}
    for m, change in changes.items():
        state[f"{m}.weight"] = state[f"{m}.weight"] + change
    return {k: v.cpu().contiguous() for k, v in state.items()}


EDITED_TARGET_FILE = "target.safetensors"
EDITED_META_FILE = "edited_target.json"


def export_baked(session: RunSession, edit: Edit, out: Path, *, note: dict[str, Any] | None = None,
                 overwrite: bool = False) -> Path:
    """Write a standalone target checkpoint (weights + target spec + tokenizer) atomically; a
    Hugging Face target's directory is also a ``save_pretrained`` directory (``native``)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise AnalysisError(f"{out} already exists; choose another directory or overwrite")
    state = baked_target_state(session, edit)
    with publish_dir(out) as tmp:
        save_file(state, str(tmp / EDITED_TARGET_FILE))
        entry = session.run.target.entry
        native = False
        if entry is not None:
            entry.save_extras(tmp)
            native = entry.save_native(state, tmp)
        meta = {
            "kind": "spd-mcp edited target",
            "target": session.run.meta["target"],
            "source_run": {"name": session.run.name, "run_id": session.run_id},
            "edit": edit.describe(),
            "note": note or {},
            "native": native,
        }
        fsync_write(tmp / EDITED_META_FILE, json.dumps(meta, indent=2) + "\n")
    return out


def load_edited_target(path: Path, *, device: str = "cpu") -> nn.Module:
    """Load a checkpoint written by :func:`export_baked` as a plain target module (no SPD)."""
    from pydantic import TypeAdapter

    from spd_mcp.model.config import HFTarget, ImportTarget, ZooTarget
    from spd_mcp.model.targets import resolve_target

    path = Path(path)
    meta_file = path / EDITED_META_FILE
    if not meta_file.is_file():
        raise AnalysisError(f"{path} is not an exported edited target (no {EDITED_META_FILE})")
    meta = json.loads(meta_file.read_text())
    spec = TypeAdapter(ZooTarget | ImportTarget | HFTarget).validate_python(meta["target"])
    resolved = resolve_target(spec, weights=path / EDITED_TARGET_FILE, run_dir=path)
    return resolved.model.to(device).eval()
