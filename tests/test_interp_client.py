"""LLMPool through the real anthropic SDK against the local fake Messages API."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from pydantic import BaseModel

from spd_mcp.interp.client import (
    AskResult,
    LLMPool,
    LLMSettings,
    api_key_configured,
    extract_json,
    map_bounded,
    retry_after_s,
)
from tests.realclients.fake_messages_api import Failure, FakeMessagesAPI, text_block


class Answer(BaseModel):
    label: str
    confidence: float


GOOD = json.dumps({"label": "x", "confidence": 0.5})


def _settings(fake: FakeMessagesAPI, **kw) -> LLMSettings:
    return LLMSettings(base_url=fake.base_url, api_key="test", backoff_base_s=0.01, **kw)


def _ask(settings: LLMSettings, n: int = 1) -> list[AskResult]:
    async def go() -> list[AskResult]:
        pool = LLMPool(settings, stage="test")
        try:
            return await pool.map_bounded(range(n), lambda i: pool.ask_json("sys", f"q{i}", Answer))
        finally:
            await pool.aclose()

    return asyncio.run(go())


def test_extract_json_and_retry_after():
    assert extract_json('Sure! ```json\n{"a": {"b": 1}}\n``` bye') == {"a": {"b": 1}}
    assert extract_json("[1, 2] then {bad then {\"ok\": true}") == {"ok": True}
    assert extract_json("no json") is None
    assert retry_after_s({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({}) is None


def test_api_key_configured(monkeypatch):
    for var in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    assert not api_key_configured(LLMSettings())
    assert api_key_configured(LLMSettings(api_key="k"))
    assert api_key_configured(LLMSettings(base_url="http://127.0.0.1:1"))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    assert api_key_configured(LLMSettings())
    with pytest.raises(ValueError):
        LLMSettings(unknown=1)


def test_map_bounded_keeps_at_most_limit_tasks_alive():
    alive = peak = 0

    async def fn(i: int) -> int:
        nonlocal alive, peak
        alive += 1
        peak = max(peak, alive)
        await asyncio.sleep(0.01)
        alive -= 1
        return i * i

    assert asyncio.run(map_bounded(range(20), fn, limit=3)) == [i * i for i in range(20)]
    assert peak == 3


def test_concurrency_is_bounded_at_the_server():
    def slow(body):
        time.sleep(0.1)
        return [text_block(GOOD)]

    with FakeMessagesAPI(slow, toolless_reply=None) as fake:
        res = _ask(_settings(fake, max_concurrency=3), n=10)
    assert [r.status for r in res] == ["ok"] * 10
    assert len(fake.messages_requests()) == 10
    assert fake.max_in_flight == 3  # would be 10 unbounded


def test_429_retry_after_is_honoured():
    with FakeMessagesAPI(lambda b: [text_block(GOOD)], toolless_reply=None) as fake:
        fake.fail_next(Failure(status=429, retry_after=0.3))
        (res,) = _ask(_settings(fake))
        reqs = fake.messages_requests()
    assert res.status == "ok" and res.attempts == 2 and res.value == {"label": "x",
                                                                       "confidence": 0.5}
    assert [r.kind for r in reqs] == ["failure", "planned"]
    assert reqs[1].time - reqs[0].time >= 0.3


def test_overloaded_and_malformed_responses_are_retried_then_fail_after_max_retries():
    with FakeMessagesAPI(lambda b: [text_block(GOOD)], toolless_reply=None) as fake:
        fake.fail_next(Failure(status=529, error_type="overloaded_error", retry_after=None),
                       Failure(malformed=True))
        (res,) = _ask(_settings(fake))
        assert res.status == "ok" and res.attempts == 3
        fake.fail_next(*[Failure(status=500, retry_after=0.01)] * 3)
        (res,) = _ask(_settings(fake, max_retries=2))
    assert res.status == "failed" and res.attempts == 3 and "HTTP 500" in (res.error or "")


def test_invalid_answers_are_reasked_then_failed():
    with FakeMessagesAPI(lambda b: [text_block("I think it is about cats.")],
                         toolless_reply=None) as fake:
        (res,) = _ask(_settings(fake, max_reasks=2))
        reqs = fake.messages_requests("planned")
    assert res.status == "failed" and res.attempts == 3
    assert "re-asks" in (res.error or "") and res.input_tokens > 0
    assert len(reqs) == 3
    last = reqs[-1].body["messages"]
    assert [m["role"] for m in last] == ["user", "assistant", "user", "assistant", "user"]
    assert last[1]["content"] == "I think it is about cats."
    assert "could not be used" in last[2]["content"]

    answers = iter(['{"label": "x"}', GOOD])  # schema violation, then valid
    with FakeMessagesAPI(lambda b: [text_block(next(answers))], toolless_reply=None) as fake:
        (res,) = _ask(_settings(fake))
    assert res.status == "ok" and res.attempts == 2


def test_budget_stops_new_calls_and_ledger_counts_usage():
    usage = {"input_tokens": 1000, "output_tokens": 100}  # $0.0015 each at default prices
    with FakeMessagesAPI(lambda b: {"content": [text_block(GOOD)], "usage": usage},
                         toolless_reply=None) as fake:
        settings = _settings(fake, max_concurrency=1, budget_usd=0.01, max_tokens=100)

        async def go():
            pool = LLMPool(settings, stage="t")
            res = await pool.map_bounded(range(12), lambda i: pool.ask_json("s", "q", Answer))
            await pool.aclose()
            return res, pool.ledger

        res, ledger = asyncio.run(go())
    n_ok = sum(r.status == "ok" for r in res)
    assert 0 < n_ok < 12 and len(fake.messages_requests()) == n_ok
    assert all(r.status == "skipped" and "budget" in (r.error or "") for r in res[n_ok:])
    assert ledger.calls == n_ok and ledger.skipped == 12 - n_ok
    assert ledger.input_tokens == 1000 * n_ok and ledger.cost_usd <= 0.01
    assert ledger.cost_usd == pytest.approx(0.0015 * n_ok)


def test_circuit_breaker_opens_after_many_errors():
    with FakeMessagesAPI(lambda b: [text_block(GOOD)], toolless_reply=None) as fake:
        fake.fail_next(*[Failure(status=400, error_type="invalid_request_error")] * 10)
        res = _ask(_settings(fake, max_concurrency=1, breaker_min_calls=3), n=6)
    assert [r.status for r in res] == ["failed"] * 3 + ["skipped"] * 3
    assert all(r.error == "circuit open" for r in res[3:])
    assert len(fake.messages_requests()) == 3  # 400 is not retried; nothing after the breaker
