"""Graph artifacts: a stored graph as the self-contained JSON investigations save (and the viewer
draws)."""

from __future__ import annotations

import asyncio
from typing import Any

from spd_mcp.analysis.graph_view import graph_from_bytes
from spd_mcp.investigation.artifacts import build_graph_artifact

from .graphs import stored_graph_row
from .labels import best_labels
from .state import AppState


async def graph_artifact(
    st: AppState, graph_id: int, *, artifact_id: str, title: str, caption: str | None = None,
    max_edges: int = 300, ci_threshold: float = 0.0,
) -> dict[str, Any]:
    """The graph artifact dict of a stored graph (natural or optimised)."""
    kind, params, summary, blob, prompt_id = await stored_graph_row(st, graph_id)
    prompt = await st.store.get_prompt(prompt_id) if prompt_id is not None else None
    labels = {k: r.label or "" for k, r in (await best_labels(st)).items()}
    s = st.session

    def build() -> dict[str, Any]:
        return build_graph_artifact(
            artifact_id=artifact_id, title=title, caption=caption, run=s.run.name,
            graph_id=graph_id, graph_kind=kind, params=params, summary=summary,
            prompt_id=prompt_id, prompt_text=prompt[1] if prompt else None,
            g=graph_from_bytes(blob), token_str=s.token_str, labels=labels,
            max_edges=max_edges, ci_threshold=ci_threshold)

    return await asyncio.to_thread(build)
