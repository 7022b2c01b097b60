"""Edits of a served run: look up, create, train, measure (cached) and export."""

from __future__ import annotations

from pathlib import Path

from spd_mcp.editing.bake import export_baked
from spd_mcp.editing.book import MEASURE_KIND, EditInfo, control_recipe
from spd_mcp.editing.edit import Edit
from spd_mcp.editing.measure import EditMeasurement, MeasureSettings, measure_edit
from spd_mcp.paths import exports_dir

from .state import AppState, ProgressFn, compute

MEASURE_FORMAT = 2
"""Bumped when a measurement gains fields, so older stored results are not served."""


class Measured(EditMeasurement):
    edit_id: int
    cached: bool


async def get_edit(st: AppState, edit_id: int | None) -> Edit | None:
    """The stored edit ``edit_id`` (None passes through); unknown ids are input errors."""
    if edit_id is None:
        return None
    edit, _, _ = await st.edits.get(edit_id)
    return edit


async def measure(st: AppState, edit_id: int, settings: MeasureSettings,
                  progress: ProgressFn | None = None) -> Measured:
    """What an edit did, against the target and a random control (stored get-or-create)."""
    edit, info, params = await st.edits.get(edit_id)
    key = {"edit_id": edit_id, **settings.model_dump(), "format": MEASURE_FORMAT}
    found = await st.store.find_result(MEASURE_KIND, key)
    if found is not None:
        return Measured(**found[1], edit_id=edit_id, cached=True)
    control_fn = control_recipe(st.session, info, params)
    m = await compute(st, "measure_edit", lambda: measure_edit(
        st.session, edit, settings, control_edit=control_fn, progress=progress))
    await st.store.put_result(MEASURE_KIND, key, m.model_dump())
    return Measured(**m.model_dump(), edit_id=edit_id, cached=False)


async def export(st: AppState, edit_id: int) -> tuple[Path, EditInfo]:
    """Bake a stored edit into a standalone checkpoint under ``$SPD_MCP_HOME/exports``."""
    edit, info, _ = await st.edits.get(edit_id)
    out = exports_dir(st.session.run.name) / f"edit-{edit_id}"

    def run() -> Path:
        if out.exists():
            return out
        return export_baked(st.session, edit, out, note=info.model_dump())

    return await compute(st, "export_edit", run), info
