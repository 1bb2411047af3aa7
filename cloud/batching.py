"""Dynamic batching of decoded requests for the back half.

Requests wait in a bounded queue; one worker takes what is queued (up to ``max_batch_size``), waits
at most ``max_queue_delay`` for more, groups the batch by key (requests at different split points
cannot share a forward pass), drops work whose deadline passed or whose caller went away, and runs
each group through ``compute`` (a thread, or a compute process). A full queue refuses new work at once
instead of growing.

With ``max_in_flight`` of 2, the next batch is formed and handed over while the current one computes,
so the compute worker never waits for the event loop between batches (double buffering).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from splitwire.cloud.errors import DeadlineExceeded, ModelNotReady, Overloaded

log = logging.getLogger(__name__)

Key = TypeVar("Key", bound=Hashable)
Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class BatchTiming:
    """What one request spent waiting and computing, in seconds."""

    queue_s: float
    compute_s: float
    batch_size: int


@dataclass
class _Pending(Generic[Key, Item, Result]):
    key: Key
    item: Item
    deadline: float | None  # time.monotonic() seconds
    future: asyncio.Future[tuple[Result, BatchTiming]]
    enqueued: float = field(default_factory=time.monotonic)


# One result per item; an exception in an item's place fails that item's caller only.
Compute = Callable[[Key, Sequence[Item]], Awaitable[Sequence[Result | Exception]]]


def on_executor(
    executor: Executor, run_batch: Callable[[Key, Sequence[Item]], Sequence[Result | Exception]]
) -> Compute:
    """A blocking ``run_batch(key, items) -> results`` as a Batcher compute function running on ``executor``."""

    async def compute(key: Key, items: Sequence[Item]) -> Sequence[Result]:
        return await asyncio.get_running_loop().run_in_executor(executor, run_batch, key, items)

    return compute


class Batcher(Generic[Key, Item, Result]):
    """Collects items into batches and awaits ``compute(key, items) -> results`` for each."""

    def __init__(
        self,
        compute: Compute,
        max_batch_size: int = 32,
        max_queue_delay_s: float = 0.002,
        max_queue: int = 256,
        on_batch: Callable[[int], None] | None = None,
        max_in_flight: int = 1,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_in_flight < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size, max_queue and max_in_flight must be >= 1 and max_queue_delay >= 0")
        self._compute = compute
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue = max_queue
        self._on_batch = on_batch
        self.max_in_flight = max_in_flight
        self._queue: asyncio.Queue[_Pending[Key, Item, Result]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()  # batches handed to the executor
        self._seconds_per_item = 0.005  # running estimate, for retry hints

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue else 0

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="splitwire-batcher")

    async def stop(self) -> None:
        """Stop the worker; work still queued or computing fails as UNAVAILABLE (the server is going away)."""
        for task in [t for t in (self._worker, *self._running) if t is not None]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._worker = None
        while self._queue is not None and not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(_shutting_down())

    def retry_after_ms(self) -> int:
        """How long the queue now in line would take to clear, in ms: the hint sent with a refusal."""
        return max(1, int(1000 * self._seconds_per_item * max(self.depth, 1)))

    async def submit(self, key: Key, item: Item, deadline: float | None) -> tuple[Result, BatchTiming]:
        """Queue ``item`` and wait for its result. Raises Overloaded at once when the queue is full.

        ``deadline`` is a ``time.monotonic()`` time; work still queued then is dropped, not computed.
        """
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not called")
        if self._queue.qsize() >= self.max_queue:
            retry_ms = self.retry_after_ms()
            raise Overloaded(f"queue is full ({self.max_queue} requests); retry in {retry_ms} ms", retry_ms)
        future: asyncio.Future[tuple[Result, BatchTiming]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(key, item, deadline, future))
        # If the caller is cancelled, the future is cancelled too and the worker skips it.
        return await future

    def _live(self, pending: _Pending[Key, Item, Result], now: float) -> bool:
        """False for work nobody waits for any more; fails work whose deadline passed."""
        if pending.future.done():  # cancelled by a caller that went away
            return False
        if pending.deadline is not None and pending.deadline <= now:
            pending.future.set_exception(DeadlineExceeded("deadline passed while queued; not computed"))
            return False
        return True

    async def _collect(self, batch: list[_Pending[Key, Item, Result]]) -> None:
        """Fill ``batch`` with up to ``max_batch_size`` live items: what is queued, then what arrives
        within the queue delay of the first."""
        assert self._queue is not None
        while not batch:
            first = await self._queue.get()
            if self._live(first, time.monotonic()):
                batch.append(first)
        wait_until = batch[0].enqueued + self.max_queue_delay_s
        while len(batch) < self.max_batch_size:
            if self._queue.empty():
                remaining = wait_until - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    pending = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                pending = self._queue.get_nowait()
            if self._live(pending, time.monotonic()):
                batch.append(pending)

    async def _work(self) -> None:
        slots = asyncio.Semaphore(self.max_in_flight)
        loop = asyncio.get_running_loop()
        while True:
            await slots.acquire()
            batch: list[_Pending[Key, Item, Result]] = []
            try:
                await self._collect(batch)
            except asyncio.CancelledError:
                slots.release()
                _fail_all(batch)
                raise
            task = loop.create_task(self._run_batch(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            task.add_done_callback(lambda _: slots.release())

    async def _run_batch(self, batch: list[_Pending[Key, Item, Result]]) -> None:
        """Drop what expired during the queue delay, then run the rest, one group per key."""
        try:
            now = time.monotonic()
            groups: dict[Key, list[_Pending[Key, Item, Result]]] = {}
            for pending in batch:
                if self._live(pending, now):
                    groups.setdefault(pending.key, []).append(pending)
            for key, group in groups.items():
                await self._run_group(key, group)
        except asyncio.CancelledError:
            _fail_all(batch)
            raise

    async def _run_group(self, key: Key, group: list[_Pending[Key, Item, Result]]) -> None:
        """Run one batch; every caller gets its result, or its own exception where ``compute`` returned one
        in its place, or the batch's exception. Never raises."""
        started = time.monotonic()
        try:
            results = await self._compute(key, [p.item for p in group])
            if len(results) != len(group):
                raise RuntimeError(f"compute returned {len(results)} results for {len(group)} items")
        except Exception as exc:  # the batch failed as a whole: every caller hears of it
            log.exception("batch of %d failed", len(group))
            for pending in group:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        compute_s = time.monotonic() - started
        self._seconds_per_item = 0.9 * self._seconds_per_item + 0.1 * compute_s / len(group)
        if self._on_batch is not None:
            self._on_batch(len(group))
        for pending, result in zip(group, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, Exception):  # this item alone failed (e.g. its payload did not decode)
                pending.future.set_exception(result)
            else:
                pending.future.set_result((result, BatchTiming(started - pending.enqueued, compute_s, len(group))))


def _shutting_down() -> ModelNotReady:
    return ModelNotReady("the server is shutting down; retry, another replica will answer")


def _fail_all(batch: list[_Pending[Key, Item, Result]]) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(_shutting_down())
