"""Activation patching between a clean and a corrupt prompt: validated selections (nodes,
components, whole layers at positions), position alignment, stored get-or-create."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from spd_mcp.analysis.patching import (
    Direction,
    LayerPositions,
    PatchingResult,
    PatchSpec,
    SweepMode,
    patchable_layers,
    run_patching,
)
from spd_mcp.errors import InputError
from spd_mcp.keys import EMBED, OUTPUT, NodeKey, is_pattern

from .model_info import validity_note
from .nodesets import expand_components, expand_nodes
from .prompts import check_position, check_text, label_id, resolve_prompt
from .state import AppState, ProgressFn, compute
from .worker import remote


class StoredPatching(PatchingResult):
    run_id: int
    cached: bool
    validity_note: str | None = Field(
        None, description="a caution when the decomposition fails its validity checks")
    expanded: dict[str, int] | None = Field(
        None, description="each pattern given → how many keys it became")


async def _prompt(st: AppState, text: str | None, prompt_id: int | None,
                  name: str) -> tuple[list[int], int]:
    """Ids and stored id of one side; errors name the argument."""
    if (text is None) == (prompt_id is None):
        raise InputError(f"give exactly one of {name} or {name}_prompt_id")
    arg = name if text is not None else f"{name}_prompt_id"
    try:
        if text is not None:
            check_text(text, name)
        return await resolve_prompt(st, text, prompt_id)
    except InputError as e:
        msg = str(e).removeprefix("text: ")
        raise InputError(msg if msg.startswith(name) else f"{arg}: {msg}") from None


def _pairs(position_map: dict[int, int] | None, n_clean: int,
           n_corrupt: int) -> list[tuple[int, int]] | None:
    """Validated (clean, corrupt) position pairs (None: aligned)."""
    if position_map is None:
        if n_clean != n_corrupt:
            raise InputError(
                f"clean has {n_clean} tokens and corrupt {n_corrupt}; aligned patching needs "
                "equal lengths: give position_map {clean_pos: corrupt_pos} (e.g. the last "
                f"positions: {{{n_clean - 1}: {n_corrupt - 1}}})")
        return None
    if not position_map:
        raise InputError("position_map is empty; omit it for aligned prompts or map at least "
                         "one clean position to a corrupt position")
    pairs = sorted((check_position(c, n_clean, "position_map: clean position"),
                    check_position(k, n_corrupt, "position_map: corrupt position"))
                   for c, k in position_map.items())
    cs, ks = [c for c, _ in pairs], [k for _, k in pairs]
    if len(set(cs)) < len(cs) or len(set(ks)) < len(ks):
        raise InputError("position_map must be one-to-one: each clean and each corrupt position "
                         "at most once (count -1 as the last)")
    return pairs


def _spec(st: AppState, nodes: Sequence[str] | None, components: Sequence[str] | None,
          layers: Sequence[LayerPositions] | None, n_clean: int,
          mapped: list[int]) -> PatchSpec | None:
    """The patch set in clean positions (None when nothing is selected)."""
    s = st.session
    ok = set(mapped)

    def need_mapped(pos: int, arg: str) -> None:
        if pos not in ok:
            raise InputError(f"{arg}: clean position {pos} is not in position_map; mapped "
                             f"positions: {sorted(ok)}")

    comp_nodes: list[NodeKey] = []
    outputs: list[tuple[str, int]] = []
    emb_decomposed = EMBED in s.keys.Cs
    has_embed = EMBED in patchable_layers(s)
    for key in nodes or []:
        special = not (emb_decomposed and str(key).startswith(f"{EMBED}:"))
        try:
            n = s.keys.node(key, n_clean, allow_special=special)
        except InputError as e:
            raise InputError(f"nodes: {e}") from None
        if n.layer == OUTPUT:
            raise InputError(f"nodes: {key!r} is an output node; patch components "
                             "'LAYER:POS:C' or embeddings 'embed:POS:0'")
        need_mapped(n.pos, f"nodes: {key!r}")
        if n.layer == EMBED and not emb_decomposed:
            if not has_embed:
                raise InputError(f"nodes: {key!r}: this model has no embedding module to patch")
            outputs.append((EMBED, n.pos))
        else:
            comp_nodes.append(n)
    try:
        comps = s.keys.components(list(components or []))
    except InputError as e:
        raise InputError(f"components: {e}") from None
    comp_nodes += [NodeKey(c.layer, p, c.c) for c in comps for p in mapped]
    valid = patchable_layers(s)
    for i, lp in enumerate(layers or []):
        if lp.layer not in valid:
            raise InputError(f"layers_at_positions[{i}].layer: unknown layer {lp.layer!r}; "
                             f"valid: {', '.join(valid)}")
        arg = f"layers_at_positions[{i}].positions"
        if lp.positions is None:
            poss = mapped
        elif not lp.positions:
            raise InputError(f"{arg} is empty; omit it for every position")
        else:
            poss = [check_position(p, n_clean, arg) for p in lp.positions]
        for p in poss:
            need_mapped(p, arg)
            outputs.append((lp.layer, p))
    if not comp_nodes and not outputs:
        return None
    return PatchSpec(nodes=tuple(sorted(set(comp_nodes))), outputs=tuple(sorted(set(outputs))))


async def patching(
    st: AppState, *, clean: str | None, clean_prompt_id: int | None, corrupt: str | None,
    corrupt_prompt_id: int | None, label_token: str, contrast_token: str | None = None,
    nodes: Sequence[str] | None = None, components: Sequence[str] | None = None,
    layers_at_positions: Sequence[LayerPositions] | None = None,
    direction: Direction = "denoising", position_map: dict[int, int] | None = None,
    sweep: SweepMode | None = None, top: int = 20, progress: ProgressFn | None = None,
) -> StoredPatching:
    """Patch a selection (and/or sweep single patches) between two prompts (stored
    get-or-create)."""
    s = st.session
    clean_ids, clean_pid = await _prompt(st, clean, clean_prompt_id, "clean")
    corrupt_ids, corrupt_pid = await _prompt(st, corrupt, corrupt_prompt_id, "corrupt")
    try:
        label = s.token_id(label_token)
    except InputError as e:
        raise InputError(f"label_token: {e}") from None
    try:
        contrast = label_id(st, contrast_token)
    except InputError as e:
        raise InputError(f"contrast_token: {e}") from None
    if contrast is not None and contrast == label:
        raise InputError("contrast_token equals label_token; give a different token")
    pairs = _pairs(position_map, len(clean_ids), len(corrupt_ids))
    mapped = [c for c, _ in pairs] if pairs is not None else list(range(len(clean_ids)))
    expanded: dict[str, int] = {}
    if nodes and any(map(is_pattern, nodes)):  # patterns: alive means alive on the clean prompt
        pats = [k for k in nodes if is_pattern(k)]
        try:
            found_nodes, expanded = await expand_nodes(st, pats, clean_ids)
        except InputError as e:
            raise InputError(f"nodes: {e}") from None
        nodes = [k for k in nodes if not is_pattern(k)] + [str(n) for n in found_nodes]
    if components and any(map(is_pattern, components)):
        pats = [k for k in components if is_pattern(k)]
        try:
            found_comps, more = await expand_components(st, pats, clean_ids)
        except InputError as e:
            raise InputError(f"components: {e}") from None
        expanded |= more
        components = ([k for k in components if not is_pattern(k)]
                      + [str(c) for c in found_comps])
    spec = _spec(st, nodes, components, layers_at_positions, len(clean_ids), mapped)
    if spec is None and sweep is None:
        raise InputError("nothing to patch: give nodes, components or layers_at_positions (a "
                         "patch set), or sweep ('nodes', 'components' or 'layers')")
    key = {"clean": clean_pid, "corrupt": corrupt_pid, "label": label, "contrast": contrast,
           "direction": direction, "pairs": pairs, "sweep": sweep, "top": top,
           "nodes": sorted(str(n) for n in spec.nodes) if spec else [],
           "outputs": [list(o) for o in spec.outputs] if spec else []}
    used = set(s.layers) if sweep is not None else set()
    if spec is not None:
        used |= {n.layer for n in spec.nodes} | {layer for layer, _ in spec.outputs}
    note = await validity_note(st, used)
    found = await st.store.find_result("patching", key)
    if found is not None:
        return StoredPatching(**found[1], run_id=found[0], cached=True, validity_note=note,
                              expanded=expanded or None)
    res = await compute(st, "patching", remote(
        run_patching, s, clean_ids, corrupt_ids, label, contrast=contrast, spec=spec,
        direction=direction, position_map=dict(pairs) if pairs is not None else None,
        sweep=sweep, top=top, progress=progress))
    rid = await st.store.put_result("patching", key, res.model_dump(), None, clean_pid)
    return StoredPatching(**res.model_dump(), run_id=rid, cached=False, validity_note=note,
                          expanded=expanded or None)
