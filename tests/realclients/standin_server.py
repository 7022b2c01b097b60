"""A tiny MCP server with the CLI shape of `spd-mcp serve`, for proving the real-client harness.

    python standin_server.py [--run R] [--call-log FILE]                       # stdio
    python standin_server.py [--run R] --http [--host H] [--port P] [--token T] [--call-log FILE]

Over HTTP it prints `SPD-MCP READY http://HOST:PORT/mcp` on stderr once listening (port 0 picks a
free port) and, with `--token`, answers 401 to requests without `Authorization: Bearer T`.
Every tool call is appended as one JSON line to `--call-log`, so tests can see what reached it.
Run it by path: it imports nothing from the repository.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mcp.server.mcpserver import MCPServer

READY_PREFIX = "SPD-MCP READY "

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def build_server(call_log: str | None) -> MCPServer:
    """The stand-in server: tools `echo` and `add`, each call logged to `call_log`."""
    mcp = MCPServer("spd", instructions="Stand-in for spd-mcp used by the harness tests.")

    def log(tool: str, arguments: dict[str, Any]) -> None:
        if call_log:
            with open(call_log, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"tool": tool, "arguments": arguments, "pid": os.getpid()}))
                fh.write("\n")

    @mcp.tool()
    def echo(text: str) -> str:
        """Return `text` unchanged. Example: echo(text="hi") -> "hi"."""
        log("echo", {"text": text})
        return text

    @mcp.tool()
    def add(a: float, b: float) -> float:
        """Add two numbers. Example: add(a=2, b=3) -> 5."""
        log("add", {"a": a, "b": b})
        return a + b

    return mcp


def bearer_guard(app: ASGIApp, token: str) -> ASGIApp:
    """Wrap an ASGI app so HTTP requests need `Authorization: Bearer <token>`."""
    expected = f"Bearer {token}".encode()

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, expected):
                body = b'{"error": "unauthorized", "detail": "missing or wrong bearer token"}'
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b"Bearer"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded


async def serve_http(mcp: MCPServer, host: str, port: int, token: str | None) -> None:
    """Serve streamable HTTP on host:port (0 = any free port) and announce readiness on stderr."""
    import uvicorn

    app: ASGIApp = mcp.streamable_http_app(host=host)
    if token:
        app = bearer_guard(app, token)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task
            raise SystemExit("uvicorn stopped before it started")
        await asyncio.sleep(0.02)
    shown = f"[{host}]" if ":" in host else host
    print(f"{READY_PREFIX}http://{shown}:{bound_port}/mcp", file=sys.stderr, flush=True)
    await task


def main(argv: list[str] | None = None) -> None:
    """Parse the `spd-mcp serve`-shaped command line and serve."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="standin", help="ignored; mirrors spd-mcp serve")
    p.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--token", default=None)
    p.add_argument("--call-log", default=os.environ.get("STANDIN_CALL_LOG"))
    args = p.parse_args(argv)
    mcp = build_server(args.call_log)
    if args.http:
        asyncio.run(serve_http(mcp, args.host, args.port, args.token))
    else:
        mcp.run()


if __name__ == "__main__":
    main()
