"""A bounded, budgeted, retrying pool of JSON asks to the Anthropic Messages API (DESIGN §7).

One :class:`LLMPool` per labelling stage. Every ask is validated against a pydantic schema;
failures are explicit results ("failed" / "skipped"), never exceptions or silent gaps.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spd_mcp.errors import SpdMcpError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

MAX_BACKOFF_S = 60.0
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}


NO_KEY = ("no Anthropic API key: set ANTHROPIC_API_KEY (e.g. `export ANTHROPIC_API_KEY=sk-ant-...`)"
          ", or point --base-url (or ANTHROPIC_BASE_URL) at a Messages-API-compatible endpoint")


class LLMSettings(BaseModel):
    """Model, endpoint, limits and prices of a labelling stage."""

    model_config = ConfigDict(extra="forbid")

    model: str = "claude-haiku-4-5"
    base_url: str | None = Field(None, description="else ANTHROPIC_BASE_URL, else the SDK default")
    api_key: str | None = Field(None, description="else ANTHROPIC_API_KEY / ANTHROPIC_AUTH_TOKEN")
    max_concurrency: int = Field(8, ge=1)
    max_retries: int = Field(4, ge=0, description="retries per request on 429/5xx/timeouts")
    timeout_s: float = Field(60, gt=0, description="total time per request")
    max_tokens: int = Field(600, ge=1)
    max_reasks: int = Field(2, ge=0, description="re-asks after an invalid JSON/schema answer")
    budget_usd: float | None = Field(None, ge=0, description="hard cap for this pool")
    usd_per_mtok_in: float = Field(1.0, ge=0)
    usd_per_mtok_out: float = Field(5.0, ge=0)
    breaker_min_calls: int = Field(10, ge=1)
    breaker_error_rate: float = Field(0.5, gt=0, le=1)
    backoff_base_s: float = Field(0.5, ge=0, description="first retry delay without retry-after")


class AskResult(BaseModel):
    """Outcome of one ask: the validated answer, or why there is none."""

    status: Literal["ok", "failed", "skipped"]
    value: dict[str, Any] | None = None
    error: str | None = None
    attempts: int = Field(0, description="HTTP requests made (retries and re-asks included)")
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


class CostLedger(BaseModel):
    """What a pool spent: billed calls, tokens, dollars, and failed / skipped asks."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    failed: int = 0
    skipped: int = 0

    def __add__(self, other: CostLedger) -> CostLedger:
        fields = type(self).model_fields
        return CostLedger(**{k: getattr(self, k) + getattr(other, k) for k in fields})

    def summary(self) -> str:
        return (f"{self.calls} calls, {self.input_tokens:,} in / {self.output_tokens:,} out "
                f"tokens, ${self.cost_usd:.4f}, {self.failed} failed, {self.skipped} skipped")


def api_key_configured(settings: LLMSettings) -> bool:
    """True when a key (settings or environment) or a custom endpoint is configured."""
    return bool(settings.api_key or os.environ.get("ANTHROPIC_API_KEY")
                or os.environ.get("ANTHROPIC_AUTH_TOKEN") or settings.base_url
                or os.environ.get("ANTHROPIC_BASE_URL"))


def extract_json(text: str) -> dict[str, Any] | None:
    """The first JSON object in ``text`` (prose or code fences around it are ignored)."""
    dec = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = dec.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            return obj
        start = text.find("{", start + 1)
    return None


def retry_after_s(headers: Any) -> float | None:
    """Delay asked by ``retry-after-ms`` / ``retry-after`` (seconds or HTTP date), if any."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra:
        try:
            return max(0.0, float(ra))
        except ValueError:
            when = email.utils.parsedate_to_datetime(ra)
            if when is not None:
                return max(0.0, when.timestamp() - time.time())
    return None


async def map_bounded(items: Iterable[T], fn: Callable[[T], Awaitable[R]], *,
                      limit: int) -> list[R]:
    """``fn`` over ``items`` with at most ``limit`` tasks alive; results in input order.

    The first exception (or a cancellation) cancels the tasks still running and propagates.
    """
    it = iter(enumerate(items))
    results: dict[int, R] = {}
    running: dict[asyncio.Task[R], int] = {}

    def refill() -> None:
        while len(running) < limit:
            nxt = next(it, None)
            if nxt is None:
                return
            running[asyncio.ensure_future(fn(nxt[1]))] = nxt[0]

    try:
        refill()
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                results[running.pop(task)] = task.result()
            refill()
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
    return [results[i] for i in range(len(results))]


class _Transient(SpdMcpError):
    def __init__(self, msg: str, retry_after: float | None = None) -> None:
        super().__init__(msg)
        self.retry_after = retry_after


class LLMPool:
    """Bounded-concurrency JSON asks with retries, re-asks, a cost ledger, budget and breaker."""

    def __init__(self, settings: LLMSettings, *, stage: str) -> None:
        self.settings = settings
        self.stage = stage
        self._sem = asyncio.Semaphore(settings.max_concurrency)
        self._client: Any = None
        self._ledger = CostLedger()
        self._reserved = 0.0  # worst-case cost of requests in flight
        self._done = 0  # asks finished ok / failed (for the breaker)
        self._errors = 0
        self._tok_per_char = 0.5  # for the budget estimate; raised by observed usage

    @property
    def ledger(self) -> CostLedger:
        return self._ledger.model_copy()

    @property
    def circuit_open(self) -> bool:
        s = self.settings
        return self._done >= s.breaker_min_calls and self._errors / self._done >= (
            s.breaker_error_rate)

    async def map_bounded(self, items: Iterable[T], fn: Callable[[T], Awaitable[R]]) -> list[R]:
        """``map_bounded`` with this pool's ``max_concurrency``."""
        return await map_bounded(items, fn, limit=self.settings.max_concurrency)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _get_client(self) -> Any:
        if self._client is None:
            import anthropic

            s = self.settings
            key = s.api_key or os.environ.get("ANTHROPIC_API_KEY")
            token = None if key else os.environ.get("ANTHROPIC_AUTH_TOKEN")
            if not key and not token:
                key = "unused"  # a custom endpoint (base_url) that needs no key
            self._client = anthropic.AsyncAnthropic(
                api_key=key, auth_token=token, base_url=s.base_url, max_retries=0,
                timeout=s.timeout_s)
        return self._client

    def _cost(self, tin: int, tout: int) -> float:
        s = self.settings
        return (tin * s.usd_per_mtok_in + tout * s.usd_per_mtok_out) / 1e6

    @staticmethod
    def _chars(system: str, messages: list[dict[str, str]]) -> int:
        return len(system) + sum(len(m["content"]) for m in messages) + 16

    def _estimate(self, system: str, messages: list[dict[str, str]]) -> float:
        """Worst-case cost of one request: max_tokens out, and input tokens at the highest
        tokens-per-character seen so far (at least 1 token per 2 characters)."""
        tin = int(self._chars(system, messages) * self._tok_per_char) + 1
        return self._cost(tin, self.settings.max_tokens)

    def _skip(self, result: AskResult, error: str) -> AskResult:
        self._ledger.skipped += 1
        return result.model_copy(update={"status": "skipped", "error": error})

    async def ask_json(self, system: str, user: str, schema: type[BaseModel]) -> AskResult:
        """Ask until the answer validates against ``schema`` (re-asking up to max_reasks)."""
        res = AskResult(status="failed")
        if self.circuit_open:
            return self._skip(res, "circuit open")
        messages = [{"role": "user", "content": user}]
        async with self._sem:
            last_err = ""
            for _ in range(self.settings.max_reasks + 1):
                if self.circuit_open:
                    return self._skip(res, "circuit open")
                try:
                    text, tin, tout, n = await self._request(system, messages)
                except _BudgetExceeded as err:
                    return self._skip(res, str(err))
                except _RequestFailed as err:
                    res.attempts += err.attempts
                    return self._finish(res, f"request failed: {err}")
                cost = self._cost(tin, tout)
                res = res.model_copy(update={
                    "attempts": res.attempts + n, "input_tokens": res.input_tokens + tin,
                    "output_tokens": res.output_tokens + tout, "cost_usd": res.cost_usd + cost})
                obj = extract_json(text)
                if obj is None:
                    last_err = "answer has no JSON object"
                else:
                    try:
                        value = schema.model_validate(obj).model_dump(mode="json")
                    except ValidationError as err:
                        last_err = "answer does not match the schema: " + "; ".join(
                            f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}"
                            for e in err.errors())
                    else:
                        res = res.model_copy(update={"status": "ok", "value": value})
                        return self._finish(res, None)
                messages = [*messages, {"role": "assistant", "content": text or "(empty)"},
                            {"role": "user", "content": _correction(last_err, schema)}]
            return self._finish(res, f"invalid answer after {self.settings.max_reasks} re-asks: "
                                     f"{last_err}")

    def _finish(self, res: AskResult, error: str | None) -> AskResult:
        self._done += 1
        if error is not None:
            self._errors += 1
            self._ledger.failed += 1
            res = res.model_copy(update={"status": "failed", "error": error})
        return res

    async def _request(self, system: str, messages: list[dict[str, str]]
                       ) -> tuple[str, int, int, int]:
        """One logical request with retries: (text, input tokens, output tokens, attempts)."""
        s = self.settings
        attempts = 0
        while True:
            est = self._estimate(system, messages)
            if s.budget_usd is not None and (
                    self._ledger.cost_usd + self._reserved + est > s.budget_usd):
                raise _BudgetExceeded(
                    f"budget ${s.budget_usd:g} reached (spent ${self._ledger.cost_usd:.4f})")
            attempts += 1
            self._reserved += est
            try:
                return (*await self._once(system, messages), attempts)
            except _Transient as err:
                if attempts > s.max_retries:
                    raise _RequestFailed(f"{err} (after {attempts} attempts)", attempts) from None
                backoff = s.backoff_base_s * 2 ** (attempts - 1) * (1 + 0.25 * random.random())
                delay = min(MAX_BACKOFF_S, backoff)
                if err.retry_after is not None:
                    delay = max(delay, err.retry_after)  # never sooner than the server asked
                log.info("%s: %s; retrying in %.2f s", self.stage, err, delay)
                await asyncio.sleep(delay)
            except _RequestFailed as err:
                err.attempts = attempts
                raise
            finally:
                self._reserved -= est

    async def _once(self, system: str, messages: list[dict[str, str]]) -> tuple[str, int, int]:
        import anthropic

        s = self.settings
        try:
            msg = await asyncio.wait_for(
                self._get_client().messages.create(
                    model=s.model, max_tokens=s.max_tokens, system=system, messages=messages),
                timeout=s.timeout_s)
        except (TimeoutError, anthropic.APITimeoutError):
            raise _Transient(f"timed out after {s.timeout_s:g} s") from None
        except anthropic.APIStatusError as err:
            msg_ = f"HTTP {err.status_code}: {_err_message(err)}"
            if err.status_code in _RETRY_STATUS or err.status_code >= 500:
                raise _Transient(msg_, retry_after_s(err.response.headers)) from None
            raise _RequestFailed(msg_) from None
        except anthropic.APIConnectionError as err:
            raise _Transient(f"connection error: {err}") from None
        except (anthropic.APIResponseValidationError, ValueError) as err:
            raise _Transient(f"malformed response: {type(err).__name__}") from None
        tin = int(getattr(msg.usage, "input_tokens", 0) or 0)
        tout = int(getattr(msg.usage, "output_tokens", 0) or 0)
        self._tok_per_char = max(self._tok_per_char, tin / self._chars(system, messages))
        self._ledger.calls += 1
        self._ledger.input_tokens += tin
        self._ledger.output_tokens += tout
        self._ledger.cost_usd += self._cost(tin, tout)
        text = "".join(getattr(b, "text", "") for b in msg.content if b.type == "text")
        return text, tin, tout


class _BudgetExceeded(SpdMcpError):
    pass


class _RequestFailed(SpdMcpError):
    def __init__(self, msg: str, attempts: int = 1) -> None:
        super().__init__(msg)
        self.attempts = attempts


def _err_message(err: Any) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", err))
    return str(err)


def _correction(error: str, schema: type[BaseModel]) -> str:
    return (f"Your answer could not be used ({error}). Reply with only one JSON object matching "
            f"this JSON schema, and nothing else:\n{json.dumps(schema.model_json_schema())}")
