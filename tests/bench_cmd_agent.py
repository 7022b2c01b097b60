"""A ``cmd:`` agent for the bench tests: connects to the server it is given (SPD_MCP_URL and
SPD_MCP_TOKEN from the launcher), answers with the top components by output token for the
behaviour named in ``sys.argv[1]``, and prints a stream-json ``result`` line with made-up usage."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


async def main(behaviour: str) -> None:
    headers = {"Authorization": f"Bearer {os.environ['SPD_MCP_TOKEN']}"}
    async with (create_mcp_http_client(headers=headers) as http,
                Client(streamable_http_client(os.environ["SPD_MCP_URL"],
                                              http_client=http)) as client):
        info = (await client.call_tool("get_model_info", {})).structured_content or {}
        [b] = [b for b in info["planted_behaviours"] if b["name"] == behaviour]
        found = await client.call_tool("search_components",
                                       {"output_token": b["expected_next_token"], "limit": 4})
        keys = [c["key"] for c in (found.structured_content or {})["components"]]
        await client.call_tool("save_explanation", {
            "behaviour": behaviour, "confidence": 0.2,
            "components": [{"key": k, "role": "top by output token"} for k in keys],
            "evidence": [{"type": "other", "description": "cmd agent"}]})
        await client.call_tool("set_investigation_summary", {
            "title": "cmd", "summary": Path(os.environ["SPD_MCP_QUESTION_FILE"]).read_text()[:100],
            "status": "completed"})
    print(json.dumps({"type": "result", "subtype": "success", "is_error": False, "num_turns": 4,
                      "total_cost_usd": 0.25, "usage": {"input_tokens": 1000,
                                                        "output_tokens": 50}}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
