"""Where a payload is decoded: on the event loop when that is cheap, on a decode thread when not.

A hop to a thread costs tens of microseconds of handoff and GIL traffic on both sides, more than
decoding a typical fp16 payload does. So each codec's cost per payload byte is learned as requests go
by (every successful decode's CPU time is measured on the thread that ran it, so waiting for the GIL
or for the executor does not count), and a payload whose predicted decode time is
under ``inline_budget_s`` is decoded inline; anything larger or slower (entropy-coded bodies, megabyte
payloads) goes to the executor and never stalls the loop. Until a codec has decoded a few payloads,
its payloads go to the executor. Refused payloads teach nothing: they usually fail in the header, and
must not make a codec look cheaper than it is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

Result = TypeVar("Result")

DEFAULT_INLINE_BUDGET_S = 100e-6
MAX_INLINE_BYTES = 256 * 1024
_WARMUP_DECODES = 8
_SMOOTHING = 0.1


class DecodePlacer:
    """Runs ``decode(payload)`` inline or on ``executor`` by its predicted cost; keeps the estimates."""

    def __init__(self, executor: Executor, inline_budget_s: float = DEFAULT_INLINE_BUDGET_S) -> None:
        self._executor = executor
        self.inline_budget_s = inline_budget_s
        self._seconds_per_byte: dict[str, float] = {}
        self._seen: dict[str, int] = {}

    def predicted_seconds(self, codec: str, size: int) -> float | None:
        """Expected decode time of ``size`` bytes with ``codec``; None while still learning it."""
        if self._seen.get(codec, 0) < _WARMUP_DECODES:
            return None
        return self._seconds_per_byte[codec] * max(size, 1)

    def inline(self, codec: str, size: int) -> bool:
        predicted = self.predicted_seconds(codec, size)
        return predicted is not None and predicted <= self.inline_budget_s and size <= MAX_INLINE_BYTES

    async def run(self, codec: str, payload: bytes, decode: Callable[[bytes], Result]) -> Result:
        """``decode(payload)``, inline or on the executor; raises what ``decode`` raises."""

        def timed(data: bytes) -> tuple[Result, float]:
            started = time.thread_time()
            result = decode(data)
            return result, time.thread_time() - started

        if self.inline(codec, len(payload)):
            result, seconds = timed(payload)
        else:
            result, seconds = await asyncio.get_running_loop().run_in_executor(self._executor, timed, payload)
        self._learn(codec, len(payload), seconds)
        return result

    def _learn(self, codec: str, size: int, seconds: float) -> None:
        per_byte = seconds / max(size, 1)
        previous = self._seconds_per_byte.get(codec)
        self._seconds_per_byte[codec] = per_byte if previous is None else previous + _SMOOTHING * (per_byte - previous)
        self._seen[codec] = self._seen.get(codec, 0) + 1
