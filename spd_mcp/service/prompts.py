"""Prompts: validated text and positions, stored get-or-create (the same text, the same id)."""

from __future__ import annotations

from spd_mcp.errors import InputError

from .state import AppState

MAX_TEXT_CHARS = 4000


def check_text(text: str, name: str = "text") -> str:
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{name} is empty; give at least one word")
    if len(text) > MAX_TEXT_CHARS:
        raise InputError(f"{name} has {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    return text


def check_position(pos: int | None, n: int, name: str = "position") -> int:
    """A position in a prompt of ``n`` tokens (None or -1: the last)."""
    if pos is None:
        return n - 1
    if not -n <= pos < n:
        raise InputError(
            f"{name} {pos} out of range (prompt has {n} tokens: 0..{n - 1}, or -1 for last)")
    return pos % n


async def resolve_prompt(
    st: AppState, text: str | None, prompt_id: int | None
) -> tuple[list[int], int]:
    """Token ids and stored prompt id from exactly one of ``text`` / ``prompt_id``."""
    if (text is None) == (prompt_id is None):
        raise InputError("give exactly one of text or prompt_id")
    if prompt_id is not None:
        found = await st.store.get_prompt(prompt_id)
        if found is None:
            n = await st.store.count_prompts()
            raise InputError(f"prompt_id {prompt_id} does not exist ({n} prompts stored; "
                             "create one with create_prompt)")
        return found[0], prompt_id
    assert text is not None
    check_text(text)
    try:
        ids = st.session.encode(text)
    except InputError as e:
        raise InputError(f"text: {e}") from None
    return ids, await st.store.get_or_create_prompt(ids, text)


def label_id(st: AppState, token: str | None) -> int | None:
    """The id of an optional vocabulary word (an error naming it when unknown)."""
    return None if token is None else st.session.token_id(token)
