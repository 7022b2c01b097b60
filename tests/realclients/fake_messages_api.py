"""A scripted local fake of the Anthropic Messages API, for driving real clients offline.

`FakeMessagesAPI(planner)` serves `POST /v1/messages` (SSE when `"stream": true`, else JSON) and
`POST /v1/messages/count_tokens` on 127.0.0.1 with an OS-assigned port, in a background thread.
The planner gets each parsed request body and returns the next assistant turn: a list of content
blocks (`text_block(...)`, `tool_use_block(...)`), or a dict with `content` (and optionally
`stop_reason`, `usage`). What the fake adds on top, for Claude Code:

- requests without tools (titles, summaries, quota checks) get `toolless_reply` without asking the
  planner (set `toolless_reply=None` to plan those too, e.g. for plain SDK clients);
- when a planned `tool_use` names a tool that is not in the request's tools, the fake first calls
  Claude Code's `WaitForMcpServers` (offered while MCP servers are still connecting; at most 3
  times) and/or `ToolSearch` with `{"query": "select:NAME"}` (offered when MCP tools are
  deferred), then asks the planner again; those turns are invisible to `tool_results()` and
  `planned_turns()`;
- every request is recorded (thread-safe), in-flight concurrency is counted, and failures can be
  injected (`fail_next(Failure(429, retry_after=1))`, `Failure(malformed=True)`).

Planner exceptions are answered with a 500 and re-raised by `check()` (and on leaving `with`).
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

Block = dict[str, Any]
Body = dict[str, Any]
Planner = Callable[[Body], "Sequence[Block] | dict[str, Any]"]
TOOL_SEARCH = "ToolSearch"
WAIT_FOR_MCP = "WaitForMcpServers"
HARNESS_TOOLS = (TOOL_SEARCH, WAIT_FOR_MCP)  # Claude Code's own tools the fake calls by itself


def text_block(text: str) -> Block:
    """An assistant text block."""
    return {"type": "text", "text": text}


def tool_use_block(name: str, tool_input: dict[str, Any], tool_id: str | None = None) -> Block:
    """An assistant tool_use block (an id is made up when not given)."""
    return {
        "type": "tool_use",
        "id": tool_id or f"toolu_{uuid.uuid4().hex[:20]}",
        "name": name,
        "input": tool_input,
    }


@dataclass(frozen=True)
class ToolResult:
    """A tool_use the assistant made, paired with the tool_result the client sent back."""

    name: str
    input: dict[str, Any]
    text: str  # the result's text blocks joined with newlines
    is_error: bool
    content: Any  # the raw tool_result content (string or list of blocks)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text"
        )
    return ""


def _blocks(message: dict[str, Any]) -> list[Block]:
    content = message.get("content")
    return [text_block(content)] if isinstance(content, str) else list(content or [])


def tool_results(body: Body, *, include_harness: bool = False) -> list[ToolResult]:
    """Tool calls in the request's conversation with their results, oldest first.

    Calls of ToolSearch / WaitForMcpServers (made by the fake itself) are left out unless
    `include_harness`.
    """
    uses: dict[str, Block] = {}
    out: list[ToolResult] = []
    for message in body.get("messages", []):
        for block in _blocks(message):
            if block.get("type") == "tool_use":
                uses[block["id"]] = block
            elif block.get("type") == "tool_result" and block.get("tool_use_id") in uses:
                use = uses[block["tool_use_id"]]
                if use["name"] in HARNESS_TOOLS and not include_harness:
                    continue
                out.append(
                    ToolResult(
                        use["name"],
                        use.get("input", {}),
                        _content_text(block.get("content")),
                        bool(block.get("is_error")),
                        block.get("content"),
                    )
                )
    return out


def tool_names(body: Body) -> list[str]:
    """Names of the tools offered in a request."""
    return [t.get("name", "") for t in body.get("tools") or []]


def user_text(body: Body) -> str:
    """Text of the first user message (the prompt), without Claude Code's system reminders."""
    for message in body.get("messages", []):
        if message.get("role") == "user":
            blocks = [
                b
                for b in _blocks(message)
                if not str(b.get("text", "")).lstrip().startswith("<system-reminder>")
            ]
            return _content_text(blocks)
    return ""


def planned_turns(body: Body) -> int:
    """How many assistant turns so far were planned (turns the fake added itself do not count)."""
    count = 0
    for message in body.get("messages", []):
        if message.get("role") != "assistant":
            continue
        names = [b.get("name") for b in _blocks(message) if b.get("type") == "tool_use"]
        if not (names and all(n in HARNESS_TOOLS for n in names)):
            count += 1
    return count


def scripted(*steps: Sequence[Block] | Callable[[Body], Sequence[Block]]) -> Planner:
    """A planner that plays `steps` in order: step i answers after i planned assistant turns.

    A step is a list of blocks, or a callable taking the request body (use `tool_results(body)`
    to plan from what the server answered). Past the last step it answers "done".
    """

    def planner(body: Body) -> Sequence[Block]:
        i = planned_turns(body)
        if i >= len(steps):
            return [text_block("done")]
        step = steps[i]
        return step(body) if callable(step) else step

    return planner


@dataclass
class Failure:
    """An injected failure, used for the next /v1/messages request."""

    status: int = 429
    retry_after: float | None = 0.01  # seconds; sent as retry-after and retry-after-ms headers
    error_type: str = "rate_limit_error"
    message: str = "injected failure"
    malformed: bool = False  # answer 200 with a broken body (truncated JSON / broken SSE) instead


@dataclass
class RecordedRequest:
    """One request the fake received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Body | None
    # planned, tool_search, wait_for_mcp, toolless, count_tokens, failure, error, probe, other
    kind: str
    time: float
    response: list[Block] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output quiet."""

    def do_HEAD(self) -> None:
        self.server.fake._record(self, None, "probe")
        self._send_json(200, {}, head=True)

    def do_GET(self) -> None:
        self.server.fake._record(self, None, "probe")
        self._send_json(200, {})

    def do_POST(self) -> None:
        fake = self.server.fake
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            body = {"_unparsed": raw.decode("utf-8", "replace")}
        path = urlsplit(self.path).path.rstrip("/")
        if path == "/v1/messages/count_tokens":
            fake._record(self, body, "count_tokens")
            self._send_json(200, {"input_tokens": _estimate_tokens(body)})
        elif path == "/v1/messages":
            fake._enter()
            try:
                fake._messages(self, body)
            finally:
                fake._leave()
        else:
            fake._record(self, body, "other")
            self._send_json(404, _error_body("not_found_error", f"fake has no {path}"))

    def _send_json(
        self,
        status: int,
        payload: Any,
        headers: dict[str, str] | None = None,
        head: bool = False,
        raw: bytes | None = None,
    ) -> None:
        data = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", f"req_fake_{uuid.uuid4().hex[:12]}")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _send_sse(self, events: list[tuple[str, Any]], broken: bool = False) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("connection", "close")
        self.send_header("request-id", f"req_fake_{uuid.uuid4().hex[:12]}")
        self.end_headers()
        self.close_connection = True
        for name, data in events:
            self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()
        if broken:
            self.wfile.write(b'event: content_block_start\ndata: {"type": "content_bl\n\n')
            self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeMessagesAPI

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client hanging up mid-answer is normal (timeouts, cancelled streams); stay quiet."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def _estimate_tokens(body: Body) -> int:
    return max(1, len(json.dumps(body.get("messages", []))) // 4)


class FakeMessagesAPI:
    """The fake server; use as a context manager, point clients at `base_url`."""

    def __init__(
        self,
        planner: Planner | None = None,
        *,
        toolless_reply: str | None = "OK",
        model: str = "claude-fake",
        delay_s: float = 0.0,
    ) -> None:
        self.planner: Planner = planner or (lambda body: [text_block("OK")])
        self.toolless_reply = toolless_reply
        self.model = model
        self.delay_s = delay_s  # hold each /v1/messages answer this long (to overlap requests)
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._failures: deque[Failure] = deque()
        self._errors: list[str] = []
        self._in_flight = 0
        self.max_in_flight = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FakeMessagesAPI:
        """Bind 127.0.0.1 on a free port and serve in a daemon thread."""
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            daemon=True,
            kwargs={"poll_interval": 0.05},
            name="fake-messages-api",
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeMessagesAPI:
        return self.start()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.stop()
        if exc_type is None:
            self.check()

    @property
    def base_url(self) -> str:
        """The URL to use as ANTHROPIC_BASE_URL / `anthropic.Anthropic(base_url=...)`."""
        assert self._server is not None, "fake is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- inspection --------------------------------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received so far."""
        with self._lock:
            return list(self._requests)

    def messages_requests(self, *kinds: str) -> list[RecordedRequest]:
        """The /v1/messages requests, optionally only those of the given kinds."""
        return [
            r
            for r in self.requests
            if r.path.startswith("/v1/messages")
            and r.kind != "count_tokens"
            and (not kinds or r.kind in kinds)
        ]

    @property
    def in_flight(self) -> int:
        """/v1/messages requests being answered right now."""
        with self._lock:
            return self._in_flight

    def fail_next(self, *failures: Failure) -> None:
        """Queue failures; each is used for one upcoming /v1/messages request, in order."""
        with self._lock:
            self._failures.extend(failures)

    def check(self) -> None:
        """Raise if the planner failed on any request."""
        with self._lock:
            errors = list(self._errors)
        if errors:
            raise AssertionError("fake Messages API planner failed:\n" + "\n".join(errors))

    # -- internals ---------------------------------------------------------------------------
    def _record(
        self, h: _Handler, body: Body | None, kind: str, response: list[Block] | None = None
    ) -> None:
        rec = RecordedRequest(
            h.command,
            urlsplit(h.path).path,
            {k.lower(): v for k, v in h.headers.items()},
            body,
            kind,
            time.time(),
            response or [],
        )
        with self._lock:
            self._requests.append(rec)

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _messages(self, h: _Handler, body: Body) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            failure = self._failures.popleft() if self._failures else None
        stream = bool(body.get("stream"))
        if failure is not None:
            self._record(h, body, "failure")
            self._fail(h, failure, stream)
            return
        try:
            kind, turn = self._plan(body)
        except Exception:
            tb = traceback.format_exc()
            with self._lock:
                self._errors.append(tb)
            self._record(h, body, "error")
            h._send_json(500, _error_body("api_error", f"fake planner failed: {tb[-500:]}"))
            return
        content = [dict(b) for b in turn["content"]]
        for block in content:
            if block.get("type") == "tool_use" and not block.get("id"):
                block["id"] = tool_use_block("", {})["id"]
        has_tool_use = any(b.get("type") == "tool_use" for b in content)
        stop_reason = turn.get("stop_reason") or ("tool_use" if has_tool_use else "end_turn")
        usage = turn.get("usage") or {
            "input_tokens": _estimate_tokens(body),
            "output_tokens": max(1, len(json.dumps(content)) // 4),
        }
        self._record(h, body, kind, content)
        message = {
            "id": f"msg_fake_{uuid.uuid4().hex[:20]}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model") or self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }
        if stream:
            h._send_sse(_sse_events(message))
        else:
            h._send_json(200, message)

    def _plan(self, body: Body) -> tuple[str, dict[str, Any]]:
        names = tool_names(body)
        if not names and self.toolless_reply is not None:
            return "toolless", {"content": [text_block(self.toolless_reply)]}
        planned = self.planner(body)
        turn = dict(planned) if isinstance(planned, dict) else {"content": list(planned)}
        missing = list(
            dict.fromkeys(
                b["name"]
                for b in turn["content"]
                if b.get("type") == "tool_use" and b["name"] not in names
            )
        )
        if not missing:
            return "planned", turn
        earlier = [r for r in tool_results(body, include_harness=True) if r.name in HARNESS_TOOLS]
        if WAIT_FOR_MCP in names and sum(r.name == WAIT_FOR_MCP for r in earlier) < 3:
            servers = sorted({n.split("__")[1] for n in missing if n.count("__") >= 2})
            wait_input = {"servers": servers} if servers else {}
            return "wait_for_mcp", {"content": [tool_use_block(WAIT_FOR_MCP, wait_input)]}
        query = {"query": "select:" + ",".join(missing)}
        if TOOL_SEARCH in names and query not in [r.input for r in earlier]:
            return "tool_search", {"content": [tool_use_block(TOOL_SEARCH, query)]}
        return "planned", turn

    def _fail(self, h: _Handler, failure: Failure, stream: bool) -> None:
        if failure.malformed:
            if stream:
                start = {
                    "type": "message_start",
                    "message": {
                        "id": "msg_fake_broken",
                        "type": "message",
                        "role": "assistant",
                        "model": self.model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": 1, "output_tokens": 0},
                    },
                }
                h._send_sse([("message_start", start)], broken=True)
            else:
                h._send_json(200, None, raw=b'{"id": "msg_fake_broken", "content": [')
            return
        headers = {}
        if failure.retry_after is not None:
            headers["retry-after"] = f"{failure.retry_after:g}"
            headers["retry-after-ms"] = str(round(failure.retry_after * 1000))
        h._send_json(failure.status, _error_body(failure.error_type, failure.message), headers)


def _sse_events(message: dict[str, Any]) -> list[tuple[str, Any]]:
    """The SSE event sequence the real API sends for `message`."""
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**message["usage"], "output_tokens": 1},
    }
    events: list[tuple[str, Any]] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("ping", {"type": "ping"}),
    ]
    for i, block in enumerate(message["content"]):
        if block["type"] == "tool_use":
            head = {**block, "input": {}}
            args = json.dumps(block.get("input", {}))
            deltas = [
                {"type": "input_json_delta", "partial_json": args[j : j + 16]}
                for j in range(0, len(args), 16)
            ]
        elif block["type"] == "text":
            head = {"type": "text", "text": ""}
            text = block["text"]
            deltas = [
                {"type": "text_delta", "text": text[j : j + 24]} for j in range(0, len(text), 24)
            ]
        else:
            head, deltas = block, []
        events.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": i, "content_block": head},
            )
        )
        events += [
            ("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d})
            for d in deltas
        ]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    events.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": message["usage"]["output_tokens"]},
            },
        )
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return events
