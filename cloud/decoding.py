"""Where a generation step's payload is decoded: on the event loop when that is cheap, on a decode
thread when not. (Infer payloads are decoded in the batch, where the back half runs: cloud/back.py.)

A hop to a thread buys no parallelism for decoders that hold the GIL (Python, small torch and numpy
calls), and under load it costs more than it saves: the decode thread gives the GIL up at every short
native call and then waits for the busy event loop to hand it back. When Infer payloads were still
decoded on the server's process, decoding them inline served 15-25% more requests with lower latency
than decoding on the thread (``splitwire-bench load`` A/B at MiniLM's defaults). So each codec's cost
per token is learned as payloads go by (every successful decode's CPU time is measured on the thread
that ran it, so waiting for the GIL or for the executor does not count), and a payload whose predicted
decode time is under ``inline_budget_s`` (2 ms: the longest the loop may stall for one payload) is
decoded inline; anything larger or slower (long prompts through a learned codec, megabyte payloads)
goes to the executor and never stalls the loop for longer. The cost is predicted from the token count
the header claims, not from the payload's size: an entropy-coded payload can claim many tokens in few
bytes, and its decoding time follows the tokens. Until a codec has decoded a few payloads, its payloads
go to the executor. Refused payloads teach nothing: they usually fail in the header, and must not make
a codec look cheaper than it is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

Result = TypeVar("Result")

DEFAULT_INLINE_BUDGET_S = 2e-3
MAX_INLINE_BYTES = 256 * 1024
_WARMUP_DECODES = 8
_SMOOTHING = 0.1


class DecodePlacer:
    """Runs ``decode(payload)`` inline or on ``executor`` by its predicted cost; keeps the estimates."""

    def __init__(self, executor: Executor, inline_budget_s: float = DEFAULT_INLINE_BUDGET_S) -> None:
        self._executor = executor
        self.inline_budget_s = inline_budget_s
        self._seconds_per_token: dict[str, float] = {}
        self._seen: dict[str, int] = {}

    def predicted_seconds(self, codec: str, tokens: int) -> float | None:
        """Expected time to decode ``tokens`` tokens with ``codec``; None while still learning it."""
        if self._seen.get(codec, 0) < _WARMUP_DECODES:
            return None
        return self._seconds_per_token[codec] * max(tokens, 1)

    def inline(self, codec: str, tokens: int, size: int) -> bool:
        """Whether a payload of ``size`` bytes claiming ``tokens`` tokens is decoded on the event loop."""
        predicted = self.predicted_seconds(codec, tokens)
        return predicted is not None and predicted <= self.inline_budget_s and size <= MAX_INLINE_BYTES

    async def run(self, codec: str, size: int, tokens: int, decode: Callable[[], Result]) -> Result:
        """``decode()`` of a payload of ``size`` bytes whose header claims ``tokens`` tokens, inline or on
        the executor; raises what ``decode`` raises."""

        def timed() -> tuple[Result, float]:
            started = time.thread_time()
            result = decode()
            return result, time.thread_time() - started

        if self.inline(codec, tokens, size):
            result, seconds = timed()
        else:
            result, seconds = await asyncio.get_running_loop().run_in_executor(self._executor, timed)
        self._learn(codec, tokens, seconds)
        return result

    def _learn(self, codec: str, tokens: int, seconds: float) -> None:
        per_token = seconds / max(tokens, 1)
        previous = self._seconds_per_token.get(codec)
        self._seconds_per_token[codec] = (
            per_token if previous is None else previous + _SMOOTHING * (per_token - previous)
        )
        self._seen[codec] = self._seen.get(codec, 0) + 1
