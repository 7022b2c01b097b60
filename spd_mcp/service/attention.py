"""Attention patterns and q×k score splits on a prompt: validated, stored get-or-create."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from spd_mcp.analysis.attention import AttentionResult, get_attention
from spd_mcp.editing.edit import applied
from spd_mcp.errors import InputError

from .edits import get_edit
from .model_info import validity_note
from .prompts import check_position, resolve_prompt
from .state import AppState, compute
from .worker import remote


class SplitArg(BaseModel):
    """Which pre-softmax score to split into q-term × k-term pairs."""

    model_config = ConfigDict(extra="forbid")
    layer: int = Field(description="attention block")
    head: int = Field(description="query head")
    key_position: int = Field(description="key position (at most query_position: causal)")
    query_position: int = Field(-1, description="query position (-1 = last)")


class StoredAttention(AttentionResult):
    run_id: int
    cached: bool
    validity_note: str | None = Field(
        None, description="a caution when the decomposition fails its validity checks")


def _check_index(value: int, n: int, name: str, what: str) -> int:
    if not 0 <= value < n:
        raise InputError(f"{name} {value} out of range ({what}: 0..{n - 1})")
    return value


async def attention(
    st: AppState, *, text: str | None, prompt_id: int | None,
    layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
    query_positions: Sequence[int] | None = None, top_k: int = 5,
    split: SplitArg | None = None, top_pairs: int = 10, edit: int | None = None,
) -> StoredAttention:
    """Top attended keys per (layer, head, query position) and an optional score split
    (stored get-or-create)."""
    s = st.session
    n_blocks = s.topology.n_blocks
    if n_blocks == 0:
        raise InputError(f"run {s.run.name!r} is not a transformer (no attention blocks); "
                         "get_attention needs a language-model run such as 'tales'")
    ids, pid = await resolve_prompt(st, text, prompt_id)
    T = len(ids)
    blocks = f"the model has {n_blocks} attention blocks"
    lays = (sorted({_check_index(b, n_blocks, "layers[]", blocks) for b in layers})
            if layers is not None else list(range(n_blocks)))
    H = s.topology.n_heads
    hs = None
    if heads is not None:
        hs = sorted({_check_index(h, H, "heads[]", f"{H} heads") if H else h for h in heads})
    qpos = ([check_position(p, T, "query_positions[]") for p in query_positions]
            if query_positions is not None else [T - 1])
    qpos = list(dict.fromkeys(qpos))
    sp = None
    if split is not None:
        lay = _check_index(split.layer, n_blocks, "split.layer", blocks)
        head = _check_index(split.head, H, "split.head", f"{H} heads") if H else split.head
        qp = check_position(split.query_position, T, "split.query_position")
        kp = check_position(split.key_position, T, "split.key_position")
        if kp > qp:
            raise InputError(f"split.key_position {kp} is after split.query_position {qp}; "
                             f"attention is causal (valid key positions: 0..{qp})")
        sp = (lay, head, qp, kp)
    e = await get_edit(st, edit)
    if e is not None and sp is not None:
        raise InputError("split decomposes the unedited target's score into its components; "
                         "with edit give patterns only (drop split), or split without edit")
    key = {"prompt_id": pid, "layers": lays, "heads": hs, "query_positions": qpos,
           "top_k": top_k, "split": list(sp) if sp else None, "top_pairs": top_pairs}
    if edit is not None:
        key["edit"] = edit
    note = None
    if sp is not None:
        names = s.topology.qkv_layers(sp[0])
        note = await validity_note(st, set(names[:2]) if names else set())
    found = await st.store.find_result("attention", key)
    if found is not None:
        return StoredAttention(**found[1], run_id=found[0], cached=True, validity_note=note)
    def edited() -> AttentionResult:
        assert e is not None
        with applied(s, e, s.ids_tensor(ids)):  # the edited model's patterns
            return get_attention(s, ids, layers=lays, heads=hs, query_positions=qpos,
                                 top_k=top_k, split=None, top_pairs=top_pairs)

    # an edit lives in this process's edit book, so an edited model's patterns are read here
    res = await compute(st, "get_attention", edited if e is not None else remote(
        get_attention, s, ids, layers=lays, heads=hs, query_positions=qpos, top_k=top_k,
        split=sp, top_pairs=top_pairs))
    rid = await st.store.put_result("attention", key, res.model_dump(), None, pid)
    return StoredAttention(**res.model_dump(), run_id=rid, cached=False, validity_note=note)
