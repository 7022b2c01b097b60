"""What is known about a component from the harvest and the labels."""

from __future__ import annotations

import asyncio

from spd_mcp.harvest import query as K
from spd_mcp.harvest.store import Harvest

from .labels import best_labels
from .state import AppState


async def component_info(
    st: AppState, h: Harvest, component: str, *, rank_tokens_by: K.TokenRank = "smoothed_pmi",
    top_k: int = 10, min_count: int = 3,
) -> K.ComponentInfo:
    """A component's firing statistics, associated tokens and co-firing, with its best label."""
    key = str(st.session.keys.component(component))
    row = (await best_labels(st)).get(key)
    label = row.label if row is not None else None
    info = ({"kind": row.kind, "confidence": row.confidence, "reasoning": row.reasoning}
            if row is not None else None)
    return await asyncio.to_thread(lambda: K.component_info(
        st.session, h, key, by=rank_tokens_by, k=top_k, min_count=min_count, label=label,
        label_info=info))
