"""Node and component lists with patterns (``1.attn.v:17:*``, ``*:3:*``, ``LAYER:*``, ``@alive``,
``alive``) expanded against one prompt; the alive set is computed only when a pattern asks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spd_mcp.keys import ComponentKey, NodeKey, needs_alive
from spd_mcp.model.session import RunSession

from .state import AppState, compute
from .worker import remote


def alive_pairs(session: RunSession, ids: list[int]) -> dict[str, list[tuple[int, int]]]:
    """Canonical layer → (position, component) pairs with natural CI > 0 (run on the worker)."""
    nat = session.natural_ci(ids)
    return {layer: [(int(p), int(c)) for p, c in torch.nonzero(g > 0).tolist()]
            for layer, g in nat.ci.items()}


async def expand_nodes(st: AppState, keys: Sequence[str], ids: list[int], *, cap: int = 4096,
                       name: str = "nodes") -> tuple[list[NodeKey], dict[str, int]]:
    """The node keys of ``keys`` on the prompt ``ids`` and each pattern's count."""
    alive = (await compute(st, "alive set", remote(alive_pairs, st.session, ids))
             if needs_alive(keys) else None)
    return st.session.keys.expand_nodes(list(keys), len(ids), alive=alive, cap=cap)


async def expand_components(st: AppState, keys: Sequence[str], ids: list[int] | None, *,
                            cap: int = 4096) -> tuple[list[ComponentKey], dict[str, int]]:
    """The component keys of ``keys`` (alive: natural CI > 0 somewhere on ``ids``)."""
    alive = None
    if needs_alive(keys):
        assert ids is not None, "'@alive' needs a prompt"
        pairs = await compute(st, "alive set", remote(alive_pairs, st.session, ids))
        alive = {layer: sorted({c for _, c in pc}) for layer, pc in pairs.items()}
    return st.session.keys.expand_components(list(keys), alive=alive, cap=cap)
