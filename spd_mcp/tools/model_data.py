"""Model & data tools: get_model_info, tokenize, create_prompt, search_dataset, generate."""

from __future__ import annotations

from typing import Annotated

import torch
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools.base import Tool
from pydantic import BaseModel, Field

from spd_mcp.analysis.dataset import DatasetSearchResult
from spd_mcp.editing.edit import edited_forward, edited_logits
from spd_mcp.model.text import Generation, generate
from spd_mcp.service.edits import get_edit
from spd_mcp.service.model_info import ModelInfo, model_info
from spd_mcp.service.prompts import check_text, resolve_prompt
from spd_mcp.service.state import compute

from .common import READ_ONLY, STORES, EditArg, PromptIdArg, TextArg, state, strict_tool


async def get_model_info(ctx: Context) -> ModelInfo:
    """The run being served: architecture, decomposed layers with C, key grammar, planted
    behaviours (with example prompts), which analyses exist, and the decomposition's validity
    verdict (how far to trust it). Call this first."""
    return await model_info(state(ctx))


class TokenInfo(BaseModel):
    pos: int
    token: str
    id: int
    known: bool


class Tokenized(BaseModel):
    n_tokens: int
    tokens: list[TokenInfo]
    unknown_words: list[str]
    fits_context: bool


def tokenize(
    ctx: Context,
    text: str,
) -> Tokenized:
    """Split text into tokens as the model sees them (with special tokens, e.g. <bos> at
    position 0): positions, ids, unknown words."""
    s = state(ctx).session
    check_text(text)
    tok = s.tok
    ids = tok.encode(text)
    rows = [TokenInfo(pos=p, token=s.token_str(i), id=i, known=i != tok.unk_id)
            for p, i in enumerate(ids)]
    unknown = s.unknown_words(text)
    return Tokenized(n_tokens=len(ids), tokens=rows, unknown_words=unknown,
                     fits_context=s.max_len is None or len(ids) <= s.max_len)


class NextToken(BaseModel):
    token: str
    prob: float


class PromptCreated(BaseModel):
    prompt_id: int
    n_tokens: int
    tokens: list[str]
    edit_id: int | None = None
    next_tokens: list[NextToken] | None = Field(
        None, description="the target's top-5 next tokens after the prompt")
    next_tokens_edited: list[NextToken] | None = Field(
        None, description="with edit: the edited model's top-5 next tokens")


async def create_prompt(
    ctx: Context,
    text: str,
    edit: EditArg = None,
) -> PromptCreated:
    """Store a prompt and return its id (same text, same id) and the target's top-5 next tokens
    (with edit=ID, also the edited model's); other tools accept prompt_id instead of text."""
    st = state(ctx)
    ids, pid = await resolve_prompt(st, text, None)
    out = PromptCreated(prompt_id=pid, n_tokens=len(ids), tokens=st.session.tokens(ids))
    e = await get_edit(st, edit)
    s = st.session

    def top5() -> list[list[NextToken]]:
        x = s.ids_tensor(ids)
        with torch.no_grad():
            logits = [s.cm.target(x)] + ([edited_logits(s, e, x)] if e is not None else [])
            rows = [torch.softmax(lg[0, -1].float(), -1) for lg in logits]
        return [[NextToken(token=s.token_str(i), prob=round(v, 6))
                 for v, i in zip(*(t.tolist() for t in p.topk(5)), strict=True)] for p in rows]

    tops = await compute(st, "create_prompt", top5)
    out.next_tokens = tops[0]
    if e is not None:
        out.edit_id = edit
        out.next_tokens_edited = tops[1]
    return out


async def search_dataset(
    ctx: Context,
    query: Annotated[str, Field(description="a word or phrase")],
    offset: Annotated[int, Field(ge=0)] = 0,
    limit: Annotated[int, Field(ge=1, le=100)] = 20,
) -> DatasetSearchResult:
    """Find a phrase in a fixed sample of the run's training data (2000 documents): match
    contexts with the phrase in [[ ]], paged."""
    st = state(ctx)
    check_text(query, "query")
    st.session.require_lm()
    index = await st.dataset()
    return index.search(st.session, query, offset=offset, limit=limit)


class EditedGeneration(Generation):
    edit_id: int | None = None
    unedited_text: str | None = Field(
        None, description="with edit: the target's own continuation, for comparison")


async def generate_tool(
    ctx: Context,
    text: TextArg = None,
    prompt_id: PromptIdArg = None,
    max_new_tokens: Annotated[int, Field(ge=1, le=64)] = 20,
    temperature: Annotated[float, Field(ge=0, le=5, description="0 = greedy")] = 0.0,
    seed: int = 0,
    edit: EditArg = None,
) -> EditedGeneration:
    """Continue a prompt with the target model, or with an edit applied (edit=ID; the unedited
    continuation alongside)."""
    st = state(ctx)
    ids, _ = await resolve_prompt(st, text, prompt_id)
    e = await get_edit(st, edit)

    def run() -> EditedGeneration:
        g = generate(st.session, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                     seed=seed, forward=edited_forward(st.session, e))
        out = EditedGeneration(**g.model_dump())
        if e is not None:
            out.edit_id = edit
            out.unedited_text = generate(st.session, ids, max_new_tokens=max_new_tokens,
                                         temperature=temperature, seed=seed).text
        return out

    return await compute(st, "generate", run)


generate_tool.__name__ = "generate"


class Pong(BaseModel):
    message: str
    compute_running: str | None
    estimated_wait_s: float


def ping(
    ctx: Context, message: Annotated[str, Field(max_length=1000)] = ""
) -> Pong:
    """Health check: echoes the message and reports what the compute worker is doing and the
    estimated wait."""
    ex = state(ctx).executor
    return Pong(message=message, compute_running=ex.running,
                estimated_wait_s=round(ex.estimated_wait(), 2))


def tools() -> list[Tool]:
    return [
        strict_tool(ping, READ_ONLY, "Ping"),
        strict_tool(get_model_info, READ_ONLY, "Model info"),
        strict_tool(tokenize, READ_ONLY, "Tokenize"),
        strict_tool(create_prompt, STORES, "Create prompt"),
        strict_tool(search_dataset, READ_ONLY, "Search dataset"),
        strict_tool(generate_tool, READ_ONLY, "Generate"),
    ]
