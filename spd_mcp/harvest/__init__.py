"""Harvest (DESIGN §7): firing statistics, token statistics, co-firing and activation examples
over a language-model run's dataset; streaming, resumable, shardable, merged exactly.

Names are imported lazily so that ``spd_mcp.harvest.cli`` / ``.config`` load without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spd_mcp.lazy import lazy_exports

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
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
