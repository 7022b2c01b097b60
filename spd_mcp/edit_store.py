"""Stored edits: every edit (scaling or trained adapter) is a row in the run's app database.

Rows are get-or-create by parameters (the same scaling, or the same training recipe with the same
seed, returns the stored edit). Trained vectors are kept as safetensors in the row's payload; the
run's own weights are never modified, so any edit is undone by not applying it, and re-applied
exactly by loading its row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from spd_mcp.analysis.edit import Edit
from spd_mcp.analysis.edit_train import EditTarget, TrainSettings, train_edit
from spd_mcp.analysis.session import AnalysisError, RunSession
from spd_mcp.store import AppStore

EDIT_KIND = "edit"
MEASURE_KIND = "edit_measure"


class EditInfo(BaseModel):
    edit_id: int
    type: str = Field(description="scale (runtime scaling / ablation) or train (rank-1 adapters)")
    name: str | None
    components: list[str]
    description: str
    gated: bool = Field(description="CI-gated scaling (input-dependent: cannot be baked)")
    report: dict[str, Any] | None = Field(None, description="training report (trained edits)")


def describe_scales(edit: Edit) -> str:
    parts = []
    for s in edit.scales[:8]:
        what = "ablate" if s.scale == 0 else f"scale ×{s.scale:g}"
        where = "" if s.ci_threshold is None else f" where CI > {s.ci_threshold:g}"
        parts.append(f"{what} {s.component}{where}")
    more = f" (+{len(edit.scales) - 8} more)" if len(edit.scales) > 8 else ""
    return "; ".join(parts) + more


def control_recipe(session: RunSession, info: EditInfo, params: dict[str, Any]
                   ) -> Callable[[list[str]], Edit] | None:
    """For a trained edit: retrain its stored recipe on other components (measure_edit's random
    control). None for scalings, whose control is the same scales on other components."""
    if info.type != "train":
        return None
    recipe = TrainSettings.model_validate(params["settings"])
    targets = [EditTarget.model_validate(t) for t in params["targets"]]

    def control(randoms: list[str]) -> Edit:
        return train_edit(session, randoms, targets, recipe, preserve=params["preserve"])[0]

    return control


class EditBook:
    """Edits of one run in its app database, with an in-memory cache of loaded edits."""

    def __init__(self, store: AppStore, session: RunSession) -> None:
        self.store, self.session = store, session
        self._cache: dict[int, Edit] = {}

    @property
    def run_id(self) -> str:
        return str(self.session.run.meta.get("run_id", self.session.run.name))

    async def put(self, params: dict[str, Any], edit: Edit, *, type: str, name: str | None,
                  description: str, report: dict[str, Any] | None = None
                  ) -> tuple[EditInfo, bool]:
        """Store (or find) an edit; returns its info and whether it was already stored."""
        key = {"run_id": self.run_id, "type": type, **params}
        found = await self.store.find_result(EDIT_KIND, key)
        if found is not None:
            return EditInfo(edit_id=found[0], **found[1]["info"]), True
        info = {"type": type, "name": name, "components": edit.components(),
                "description": description, "gated": edit.gated, "report": report}
        summary = {"info": info, "record": edit.describe()}
        eid = await self.store.put_result(EDIT_KIND, key, summary, edit.tensors_bytes())
        self._cache[eid] = edit
        return EditInfo(edit_id=eid, **info), False

    async def find(self, params: dict[str, Any], type: str) -> EditInfo | None:
        found = await self.store.find_result(EDIT_KIND, {"run_id": self.run_id, "type": type,
                                                         **params})
        return EditInfo(edit_id=found[0], **found[1]["info"]) if found else None

    async def get(self, edit_id: int) -> tuple[Edit, EditInfo, dict[str, Any]]:
        """The edit, its info and its creation parameters; a clear error for unknown ids."""
        row = await self.store.get_result(EDIT_KIND, edit_id)
        if row is None:
            known = [i for i, _ in await self.store.list_results(EDIT_KIND, 20)]
            raise AnalysisError(
                f"edit {edit_id} does not exist; stored edits: {sorted(known) or 'none'} "
                "(create one with edit_components or train_component_edit)")
        params, summary, blob, _ = row
        if params.get("run_id") != self.run_id:
            raise AnalysisError(f"edit {edit_id} belongs to run {params.get('run_id')!r}, "
                                f"not {self.run_id!r}")
        if edit_id not in self._cache:
            self._cache[edit_id] = Edit.from_record(summary["record"], blob, self.session.device)
        return self._cache[edit_id], EditInfo(edit_id=edit_id, **summary["info"]), params

    async def list(self, limit: int = 50) -> list[EditInfo]:
        return [EditInfo(edit_id=i, **s["info"])
                for i, s in await self.store.list_results(EDIT_KIND, limit)]
