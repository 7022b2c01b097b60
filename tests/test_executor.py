"""The compute executor: FIFO, never overlapping, fast 'busy' errors, lock released at the end."""

import asyncio
import itertools
import threading
import time

import pytest

from spd_mcp.service.executor import Busy, ComputeExecutor


def test_fifo_and_no_overlap() -> None:
    ex = ComputeExecutor(max_queue=32)

    async def main() -> list[int]:
        order: list[int] = []

        def job(i: int) -> int:
            time.sleep(0.01)
            order.append(i)
            return i

        out = await asyncio.gather(*(ex.run(f"j{i}", lambda i=i: job(i)) for i in range(10)))
        assert out == list(range(10))
        return order

    assert asyncio.run(main()) == list(range(10))
    spans = sorted((r.started, r.ended) for r in ex.history)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    ex.shutdown()


def test_queue_bound_gives_fast_busy() -> None:
    ex = ComputeExecutor(max_queue=2)
    gate = threading.Event()
    ex.submit("block", gate.wait)
    ex.submit("second", lambda: None)
    t0 = time.monotonic()
    with pytest.raises(Busy, match=r"busy: 2 compute jobs .* retry in ~"):
        ex.submit("third", lambda: None)
    assert time.monotonic() - t0 < 0.1
    gate.set()
    ex.shutdown()


def test_wait_bound_withdraws_the_job() -> None:
    ex = ComputeExecutor(max_queue=8, max_wait_s=0.2)
    gate = threading.Event()
    ran: list[str] = []

    async def main() -> None:
        ex.submit("block", gate.wait)
        with pytest.raises(Busy, match="did not start within"):
            await ex.run("late", lambda: ran.append("late"))

    asyncio.run(main())
    gate.set()
    time.sleep(0.1)
    assert ran == []  # withdrawn, never run
    ex.shutdown()


def test_cancelled_caller_does_not_release_a_running_job() -> None:
    ex = ComputeExecutor()
    started, finish = threading.Event(), threading.Event()
    done: list[str] = []

    def long_job() -> None:
        started.set()
        finish.wait(5)
        done.append("long")

    async def main() -> None:
        task = asyncio.create_task(ex.run("long", long_job))
        await asyncio.to_thread(started.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ex.running == "long"  # still holds the device
        nxt = asyncio.create_task(ex.run("next", lambda: done.append("next")))
        await asyncio.sleep(0.05)
        assert done == []
        finish.set()
        await nxt

    asyncio.run(main())
    assert done == ["long", "next"]
    ex.shutdown()


def test_errors_propagate_and_worker_survives() -> None:
    ex = ComputeExecutor()

    async def main() -> None:
        with pytest.raises(ZeroDivisionError):
            await ex.run("bad", lambda: 1 / 0)
        assert await ex.run("ok", lambda: 7) == 7

    asyncio.run(main())
    ex.shutdown()
