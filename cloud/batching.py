"""Dynamic batching of decoded requests for the back half.

Requests wait in a bounded queue; one worker takes what is queued (up to ``max_batch_size``), waits
at most ``max_queue_delay`` for more, groups the batch by key (requests at different split points
cannot share a forward pass), drops work whose deadline passed or whose caller went away, and runs
each group on one compute thread. A full queue refuses new work at once instead of growing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from splitwire.cloud.errors import DeadlineExceeded, Overloaded

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


class Batcher(Generic[Key, Item, Result]):
    """Collects items into batches and runs ``run_batch(key, items) -> results`` on ``executor``."""

    def __init__(
        self,
        run_batch: Callable[[Key, Sequence[Item]], Sequence[Result]],
        executor: Executor,
        max_batch_size: int = 32,
        max_queue_delay_s: float = 0.002,
        max_queue: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_queue_delay >= 0")
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending[Key, Item, Result]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._seconds_per_item = 0.005  # running estimate, for retry hints

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue else 0

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="splitwire-batcher")

    async def stop(self) -> None:
        """Stop the worker; queued items fail as overloaded (callers are draining anyway)."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while self._queue is not None and not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(Overloaded("server is shutting down", retry_after_ms=1000))

    async def submit(self, key: Key, item: Item, deadline: float | None) -> tuple[Result, BatchTiming]:
        """Queue ``item`` and wait for its result. Raises Overloaded at once when the queue is full."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not called")
        if self._queue.qsize() >= self.max_queue:
            retry_ms = max(1, int(1000 * self._seconds_per_item * self._queue.qsize()))
            raise Overloaded(f"queue is full ({self.max_queue} requests); retry in {retry_ms} ms", retry_ms)
        future: asyncio.Future[tuple[Result, BatchTiming]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(key, item, deadline, future))
        # If the caller is cancelled, the future is cancelled too and the worker skips it.
        return await future

    async def _collect(self) -> list[_Pending[Key, Item, Result]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        while len(batch) < self.max_batch_size and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        wait_until = batch[0].enqueued + self.max_queue_delay_s
        while len(batch) < self.max_batch_size:
            remaining = wait_until - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            now = time.monotonic()
            live: dict[Key, list[_Pending[Key, Item, Result]]] = {}
            for pending in batch:
                if pending.future.done():  # cancelled by a caller that went away
                    continue
                if pending.deadline is not None and pending.deadline <= now:
                    pending.future.set_exception(DeadlineExceeded("deadline passed while queued; not computed"))
                    continue
                live.setdefault(pending.key, []).append(pending)
            for key, group in live.items():
                started = time.monotonic()
                try:
                    results = await loop.run_in_executor(self._executor, self._run_batch, key, [p.item for p in group])
                except Exception as exc:  # the batch failed as a whole: every caller hears of it
                    log.exception("batch of %d failed", len(group))
                    for pending in group:
                        if not pending.future.done():
                            pending.future.set_exception(exc)
                    continue
                compute_s = time.monotonic() - started
                self._seconds_per_item = 0.9 * self._seconds_per_item + 0.1 * compute_s / len(group)
                if self._on_batch is not None:
                    self._on_batch(len(group))
                for pending, result in zip(group, results, strict=True):
                    if not pending.future.done():
                        timing = BatchTiming(started - pending.enqueued, compute_s, len(group))
                        pending.future.set_result((result, timing))
