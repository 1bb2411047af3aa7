"""The Batcher with a fake back half: batch size cap, queue delay, deadlines, cancellation, overload."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from splitwire.cloud.batching import Batcher, on_executor
from splitwire.cloud.errors import DeadlineExceeded, ModelNotReady, Overloaded


class FakeBack:
    """Records every batch; doubles each item. ``gate`` (when set) holds batches until released."""

    def __init__(self, gate: threading.Event | None = None, fail_on: int | None = None) -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.gate = gate
        self.fail_on = fail_on
        self.started = threading.Event()

    def __call__(self, key: str, items: Sequence[int]) -> list[int]:
        self.batches.append((key, list(items)))
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("the back half failed")
        return [2 * item for item in items]


def batcher(back: FakeBack, executor: ThreadPoolExecutor, **options: float) -> Batcher[str, int, int]:
    return Batcher(on_executor(executor, back), **options)


async def started(b: Batcher[str, int, int]) -> Batcher[str, int, int]:
    b.start()
    return b


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


def test_batches_hold_at_most_max_batch_size(executor: ThreadPoolExecutor) -> None:
    back = FakeBack()

    async def scenario() -> list[tuple[int, int]]:
        b = await started(batcher(back, executor, max_batch_size=4, max_queue_delay_s=0.05))
        results = await asyncio.gather(*(b.submit("k", i, None) for i in range(10)))
        await b.stop()
        return [(value, timing.batch_size) for value, timing in results]

    results = asyncio.run(scenario())
    assert [value for value, _ in results] == [2 * i for i in range(10)]
    assert [len(items) for _, items in back.batches] == [4, 4, 2]
    assert [size for _, size in results] == [4] * 8 + [2] * 2


def test_a_lone_request_waits_at_most_the_queue_delay_and_late_arrivals_join(executor: ThreadPoolExecutor) -> None:
    back = FakeBack()

    async def scenario() -> tuple[float, float]:
        b = await started(batcher(back, executor, max_batch_size=8, max_queue_delay_s=0.1))
        t0 = time.monotonic()
        await asyncio.gather(b.submit("k", 1, None), _after(0.02, b.submit("k", 2, None)))
        together = time.monotonic() - t0
        t0 = time.monotonic()
        await b.submit("k", 3, None)
        alone = time.monotonic() - t0
        await b.stop()
        return together, alone

    together, alone = asyncio.run(scenario())
    assert back.batches == [("k", [1, 2]), ("k", [3])]
    assert 0.09 <= together < 1.0 and 0.09 <= alone < 1.0


async def _after(seconds: float, coroutine):
    await asyncio.sleep(seconds)
    return await coroutine


def test_expired_work_is_dropped_before_compute(executor: ThreadPoolExecutor) -> None:
    back = FakeBack()

    async def scenario() -> list[object]:
        b = await started(batcher(back, executor, max_batch_size=8, max_queue_delay_s=0.05))
        now = time.monotonic()
        outcomes = await asyncio.gather(
            b.submit("k", 1, now - 1),  # already past
            b.submit("k", 2, now + 0.01),  # passes during the queue delay
            b.submit("k", 3, now + 10),
            return_exceptions=True,
        )
        await b.stop()
        return outcomes

    expired_early, expired_late, (value, _) = asyncio.run(scenario())
    assert isinstance(expired_early, DeadlineExceeded) and isinstance(expired_late, DeadlineExceeded)
    assert "not computed" in str(expired_early)
    assert value == 6 and back.batches == [("k", [3])]


def test_cancelled_callers_are_skipped(executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    back = FakeBack(gate)

    async def scenario() -> None:
        b = await started(batcher(back, executor, max_batch_size=8, max_queue_delay_s=0.0))
        first = asyncio.create_task(b.submit("k", 1, None))
        while not back.started.is_set():  # the first batch is computing; what comes next waits
            await asyncio.sleep(0.001)
        gone = asyncio.create_task(b.submit("k", 2, None))
        kept = asyncio.create_task(b.submit("k", 3, None))
        await asyncio.sleep(0.01)
        gone.cancel()
        gate.set()
        assert (await first)[0] == 2 and (await kept)[0] == 6
        with pytest.raises(asyncio.CancelledError):
            await gone
        await b.stop()

    asyncio.run(scenario())
    assert back.batches == [("k", [1]), ("k", [3])]


def test_a_full_queue_refuses_at_once_with_a_retry_hint(executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    back = FakeBack(gate)

    async def scenario() -> None:
        b = await started(batcher(back, executor, max_batch_size=1, max_queue_delay_s=0.0, max_queue=2))
        computing = asyncio.create_task(b.submit("k", 0, None))
        while not back.started.is_set():
            await asyncio.sleep(0.001)
        queued = [asyncio.create_task(b.submit("k", i, None)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        assert b.depth == 2
        t0 = time.monotonic()
        with pytest.raises(Overloaded) as caught:
            await b.submit("k", 3, None)
        assert time.monotonic() - t0 < 0.05
        assert caught.value.retry_after_ms >= 1 and "queue is full (2 requests)" in str(caught.value)
        assert caught.value.reason == "queue_full"
        gate.set()
        assert [(await t)[0] for t in (computing, *queued)] == [0, 2, 4]
        await b.stop()

    asyncio.run(scenario())


def test_keys_never_share_a_batch(executor: ThreadPoolExecutor) -> None:
    back = FakeBack()

    async def scenario() -> None:
        b = await started(batcher(back, executor, max_batch_size=8, max_queue_delay_s=0.05))
        await asyncio.gather(b.submit("a", 1, None), b.submit("b", 2, None), b.submit("a", 3, None))
        await b.stop()

    asyncio.run(scenario())
    assert sorted(back.batches) == [("a", [1, 3]), ("b", [2])]


def test_a_failed_batch_fails_its_callers_and_the_worker_goes_on(executor: ThreadPoolExecutor) -> None:
    back = FakeBack(fail_on=1)

    async def scenario() -> None:
        b = await started(batcher(back, executor, max_batch_size=8, max_queue_delay_s=0.02))
        outcomes = await asyncio.gather(b.submit("k", 1, None), b.submit("k", 2, None), return_exceptions=True)
        assert all(isinstance(o, RuntimeError) for o in outcomes)
        assert (await b.submit("k", 5, None))[0] == 10
        await b.stop()

    asyncio.run(scenario())


def test_stop_fails_queued_work_as_unavailable(executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    back = FakeBack(gate)

    async def scenario() -> None:
        b = await started(batcher(back, executor, max_batch_size=1, max_queue_delay_s=0.0))
        computing = asyncio.create_task(b.submit("k", 0, None))
        while not back.started.is_set():
            await asyncio.sleep(0.001)
        queued = asyncio.create_task(b.submit("k", 1, None))
        await asyncio.sleep(0.01)
        await b.stop()
        gate.set()
        for task in (computing, queued):
            with pytest.raises(ModelNotReady, match="shutting down"):
                await task

    asyncio.run(scenario())


def test_with_two_batches_in_flight_the_next_is_handed_over_while_one_computes() -> None:
    gate = threading.Event()
    back = FakeBack(gate)
    with ThreadPoolExecutor(max_workers=2) as pool:

        async def scenario() -> None:
            b = await started(
                Batcher(on_executor(pool, back), max_batch_size=2, max_queue_delay_s=0.0, max_in_flight=2)
            )
            tasks = [asyncio.create_task(b.submit("k", i, None)) for i in range(6)]
            while len(back.batches) < 2:  # two batches handed over, the first still computing
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.02)
            assert len(back.batches) == 2 and b.depth == 2  # the third waits for a slot
            gate.set()
            assert [(await t)[0] for t in tasks] == [0, 2, 4, 6, 8, 10]
            await b.stop()

        asyncio.run(scenario())
    assert [items for _, items in back.batches] == [[0, 1], [2, 3], [4, 5]]


def test_submit_before_start_is_a_programming_error(executor: ThreadPoolExecutor) -> None:
    with pytest.raises(RuntimeError, match="start"):
        asyncio.run(batcher(FakeBack(), executor).submit("k", 1, None))
