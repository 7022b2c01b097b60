"""Dataset attributions (DESIGN §7): component → component, input token → component and
component → output token direct effects (gradient x activation, source CI-weighted) summed over
a run's dataset; raw sums stored per config hash, normalised at query time.

Names are imported lazily so that ``spd_mcp.attributions.cli`` / ``.config`` load without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spd_mcp.lazy import lazy_exports

if TYPE_CHECKING:
    from .compute import (
        Accumulator,
        AttributionSums,
        accumulate,
        natural_ci_fn,
        reference_attributions,
    )
    from .config import AttributionConfig, AttributionError, config_hash
    from .query import AttributionEntry, resolve_key, strength, top_sources, top_targets
    from .runner import AttributionOutcome, compute_attributions, make_batches, sample_docs
    from .store import (
        AttributionManifest,
        Attributions,
        AttributionsNotFound,
        list_attributions,
        load_attributions,
    )

_EXPORTS = {
    "compute": ["Accumulator", "AttributionSums", "accumulate", "natural_ci_fn",
                "reference_attributions"],
    "config": ["AttributionConfig", "AttributionError", "config_hash"],
    "query": ["AttributionEntry", "resolve_key", "strength", "top_sources", "top_targets"],
    "runner": ["AttributionOutcome", "compute_attributions", "make_batches", "sample_docs"],
    "store": ["AttributionManifest", "Attributions", "AttributionsNotFound", "list_attributions",
              "load_attributions"],
}
__all__ = [  # noqa: RUF022 (grouped by module)
    "Accumulator", "AttributionSums", "accumulate", "natural_ci_fn", "reference_attributions",
    "AttributionConfig", "AttributionError", "config_hash",
    "AttributionEntry", "resolve_key", "strength", "top_sources", "top_targets",
    "AttributionOutcome", "compute_attributions", "make_batches", "sample_docs",
    "AttributionManifest", "Attributions", "AttributionsNotFound", "list_attributions",
    "load_attributions",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
