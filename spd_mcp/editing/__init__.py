"""Editing a target through its components (DESIGN §6).

- :mod:`.edit` — :class:`Edit` (scalings, rank-1 adapters, dense changes) applied as forward hooks
  on the exact target; :func:`scale_edit`, :func:`applied`, :func:`edited_logits`;
- :mod:`.bake` — edits baked into plain weights; standalone checkpoints (``export_baked`` /
  ``load_edited_target``);
- :mod:`.train` — rank-1 adapter training (:func:`train_edit`);
- :mod:`.measure` — what an edit did, against the target and a random control;
- :mod:`.book` — the edit book: stored edits of a run, shared by the tools, the CLI and the viewer;
- :mod:`.cli` — ``spd-mcp edit``.

Names are imported lazily so that ``spd_mcp.editing.cli`` loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spd_mcp.lazy import lazy_exports

if TYPE_CHECKING:
    from .bake import export_baked, load_edited_target
    from .book import EditBook, EditInfo
    from .edit import ComponentScale, Edit, applied, edited_logits, scale_edit
    from .measure import EditMeasurement, MeasureSettings, Probe, measure_edit
    from .train import EditTarget, TrainReport, TrainSettings, train_edit

_EXPORTS = {
    "bake": ["export_baked", "load_edited_target"],
    "book": ["EditBook", "EditInfo"],
    "edit": ["ComponentScale", "Edit", "applied", "edited_logits", "scale_edit"],
    "measure": ["EditMeasurement", "MeasureSettings", "Probe", "measure_edit"],
    "train": ["EditTarget", "TrainReport", "TrainSettings", "train_edit"],
}
__all__ = [  # noqa: RUF022 (grouped by module)
    "export_baked", "load_edited_target",
    "EditBook", "EditInfo",
    "ComponentScale", "Edit", "applied", "edited_logits", "scale_edit",
    "EditMeasurement", "MeasureSettings", "Probe", "measure_edit",
    "EditTarget", "TrainReport", "TrainSettings", "train_edit",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
