"""The edit book: every edit of a run (scaling or trained adapter) as a row of its app database.

Shared by the MCP tools, the ``spd-mcp edit`` CLI and the viewer. Rows are get-or-create by
parameters (the same scaling, or the same training recipe, returns the stored edit). Trained
vectors are kept as safetensors in the row's payload; the run's own weights are never modified,
so any edit is undone by not applying it and re-applied exactly by loading its row.

The book reads and writes through a :class:`ResultStore` (the app database of
``spd_mcp.service.store``, or anything with the same four methods).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, Field

from spd_mcp.errors import AnalysisError
from spd_mcp.model.session import RunSession

from .edit import ComponentScale, Edit, scale_edit
from .train import EditTarget, TrainReport, TrainSettings, train_edit

T = TypeVar("T")
EDIT_KIND = "edit"
MEASURE_KIND = "edit_measure"
Runner = Callable[[Callable[[], T]], Awaitable[T]]
"""runs a blocking computation (on the compute worker, in a thread, or in place)."""


class ResultStore(Protocol):
    """The part of the app database the book uses (rows keyed by kind + parameters)."""

    async def find_result(self, kind: str, params: dict[str, Any]
                          ) -> tuple[int, dict[str, Any], bytes | None] | None: ...

    async def put_result(self, kind: str, params: dict[str, Any], summary: dict[str, Any],
                         payload: bytes | None = None, prompt_id: int | None = None) -> int: ...

    async def get_result(self, kind: str, result_id: int) -> tuple[
        dict[str, Any], dict[str, Any], bytes | None, int | None] | None: ...

    async def list_results(self, kind: str, limit: int = 50) -> list[tuple[int, dict[str, Any]]]:
        ...


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
        parts.append(f"{what} {s.key}{where}")
    more = f" (+{len(edit.scales) - 8} more)" if len(edit.scales) > 8 else ""
    return "; ".join(parts) + more


def describe_training(report: TrainReport) -> str:
    return (f"{report.mode} edit of {', '.join(report.components[:6])} "
            f"({report.vectors} vectors, {report.steps} steps)")


def training_params(components: Sequence[str], targets: Sequence[EditTarget],
                    preserve: Sequence[str], settings: TrainSettings) -> dict[str, Any]:
    """The parameters a trained edit is stored (and found again) under."""
    return {"components": list(components), "targets": [t.model_dump() for t in targets],
            "preserve": list(preserve), "settings": settings.model_dump()}


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

    def __init__(self, store: ResultStore, session: RunSession) -> None:
        self.store, self.session = store, session
        self._cache: dict[int, Edit] = {}

    @property
    def run_id(self) -> str:
        return self.session.run_id

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

    # ----------------------------------------------------------------------- create
    async def scale(self, scales: Sequence[ComponentScale], *, name: str | None
                    ) -> tuple[EditInfo, bool]:
        """Store (or find) a scaling edit; keys are validated and made canonical."""
        edit = scale_edit(self.session, scales)
        params = {"scales": [s.record() for s in edit.scales]}
        return await self.put(params, edit, type="scale", name=name,
                              description=describe_scales(edit))

    async def train(
        self, components: Sequence[str], targets: Sequence[EditTarget],
        settings: TrainSettings, *, preserve: Sequence[str] = (), name: str | None = None,
        run: Runner[tuple[Edit, TrainReport]],
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[EditInfo, bool, TrainReport | None]:
        """The stored edit trained with this recipe, or train it now (through ``run``) and store
        it. Returns (info, already stored, the fresh training report or None)."""
        params = training_params(components, targets, preserve, settings)
        found = await self.find(params, "train")
        if found is not None:
            return found, True, None
        edit, report = await run(lambda: train_edit(
            self.session, components, targets, settings, preserve=preserve, progress=progress))
        info, cached = await self.put(params, edit, type="train", name=name,
                                      description=describe_training(report),
                                      report=report.model_dump())
        return info, cached, report
