"""Derived stages on demand: the harvest and dataset attributions are built on first use
(default settings, on the compute worker, with progress) unless the state says not to."""

from __future__ import annotations

from spd_mcp.attributions.store import Attributions
from spd_mcp.errors import InputError
from spd_mcp.harvest.store import Harvest

from .state import AppState, ProgressFn, compute
from .worker import remote


def _can_prepare(st: AppState) -> bool:
    return st.auto_prepare and st.session.is_language_model


async def ensure_harvest(st: AppState, progress: ProgressFn | None = None) -> Harvest:
    """The run's harvest; built on first use when the state allows it."""
    from spd_mcp.harvest.runner import harvest

    h = await st.harvest()
    if h is None and _can_prepare(st):
        await compute(st, "harvest", remote(harvest, st.session, progress=progress))
        h = await st.harvest()
    if h is None:
        name = st.session.run.name
        raise InputError(f"no harvest for run {name!r}: build one with `spd-mcp prepare {name}` "
                         f"or `spd-mcp harvest {name}` (about 15 s on one CPU core for tales)")
    return h


async def ensure_attributions(st: AppState, progress: ProgressFn | None = None) -> Attributions:
    """The run's dataset attributions; built on first use when the state allows it."""
    from spd_mcp.attributions.runner import compute_attributions

    a = await st.attributions()
    if a is None and _can_prepare(st):
        await compute(st, "attributions",
                      remote(compute_attributions, st.session, progress=progress))
        a = await st.attributions()
    if a is None:
        name = st.session.run.name
        raise InputError(f"no dataset attributions for run {name!r}: build them with `spd-mcp "
                         f"prepare {name}` or `spd-mcp attributions {name}` (about 40 s on one "
                         "CPU core for tales)")
    return a
