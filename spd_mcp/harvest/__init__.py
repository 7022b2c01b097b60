"""Harvest (DESIGN §7): firing statistics, token statistics, co-firing and activation examples
over a language-model run's dataset; streaming, resumable, shardable, merged exactly.

Names are imported lazily so that ``spd_mcp.harvest.cli`` / ``.config`` load without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import HarvestConfig, HarvestError, HarvestPlan, ShardSpec, config_hash
    from .examples import ActivationExample, component_examples
    from .reservoir import Examples
    from .runner import (
        HarvestInterrupted,
        HarvestOutcome,
        harvest,
        merge_shards,
        prepare,
        run_shard,
    )
    from .stats import (
        ComponentAssociation,
        ComponentSummary,
        HarvestStats,
        TokenAssociation,
        TokenComponent,
        component_summary,
        components_for_token,
        correlated,
        token_scores,
        top_tokens,
    )
    from .store import (
        Harvest,
        HarvestManifest,
        HarvestNotFound,
        find_harvest,
        list_harvests,
        load_harvest,
    )

_EXPORTS = {
    "config": ["HarvestConfig", "HarvestError", "HarvestPlan", "ShardSpec", "config_hash"],
    "examples": ["ActivationExample", "component_examples"],
    "reservoir": ["Examples"],
    "runner": ["HarvestInterrupted", "HarvestOutcome", "harvest", "merge_shards", "prepare",
               "run_shard"],
    "stats": ["ComponentAssociation", "ComponentSummary", "HarvestStats", "TokenAssociation",
              "TokenComponent", "component_summary", "components_for_token", "correlated",
              "token_scores", "top_tokens"],
    "store": ["Harvest", "HarvestManifest", "HarvestNotFound", "find_harvest", "list_harvests",
              "load_harvest"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = [  # noqa: RUF022 (grouped by module)
    "HarvestConfig", "HarvestError", "HarvestPlan", "ShardSpec", "config_hash",
    "ActivationExample", "component_examples",
    "Examples",
    "HarvestInterrupted", "HarvestOutcome", "harvest", "merge_shards", "prepare", "run_shard",
    "ComponentAssociation", "ComponentSummary", "HarvestStats", "TokenAssociation",
    "TokenComponent", "component_summary", "components_for_token", "correlated", "token_scores",
    "top_tokens",
    "Harvest", "HarvestManifest", "HarvestNotFound", "find_harvest", "list_harvests",
    "load_harvest",
]
assert sorted(__all__) == sorted(_WHERE)


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'spd_mcp.harvest' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)


def __dir__() -> list[str]:
    return __all__
