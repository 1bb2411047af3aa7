"""Where payloads are decoded: cheap ones inline on the event loop, costly or unknown ones on a thread."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from splitwire.cloud.decoding import MAX_INLINE_BYTES, DecodePlacer


class Recorder:
    """A fake decoder that notes which thread ran it and burns ``seconds`` of CPU per call."""

    def __init__(self, seconds: float = 0.0, fail: bool = False) -> None:
        self.seconds = seconds
        self.fail = fail
        self.threads: list[str] = []

    def __call__(self, payload: bytes) -> int:
        self.threads.append(threading.current_thread().name)
        until = time.thread_time() + self.seconds
        while time.thread_time() < until:
            pass
        if self.fail:
            raise ValueError("malformed")
        return len(payload)


def decode_many(placer: DecodePlacer, codec: str, sizes: list[int], decoder: Recorder, tokens: int = 10) -> list[str]:
    """Decode payloads of ``sizes`` bytes, each claiming ``tokens`` tokens; where each one ran."""

    async def scenario() -> None:
        for size in sizes:
            with contextlib.suppress(ValueError):  # refused payloads are part of the scenario
                await placer.run(codec, size, tokens, functools.partial(decoder, bytes(size)))

    asyncio.run(scenario())
    return ["loop" if name == "MainThread" else "executor" for name in decoder.threads]


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        yield pool


def test_cheap_codecs_move_inline_after_a_few_decodes(executor: ThreadPoolExecutor) -> None:
    placer = DecodePlacer(executor, inline_budget_s=100e-6)
    where = decode_many(placer, "fp16", [4000] * 20, Recorder())
    assert where[:8] == ["executor"] * 8 and where[8:] == ["loop"] * 12


def test_costly_codecs_and_large_payloads_stay_on_the_executor(executor: ThreadPoolExecutor) -> None:
    placer = DecodePlacer(executor, inline_budget_s=100e-6)
    assert set(decode_many(placer, "hyperprior", [200] * 12, Recorder(seconds=0.002))) == {"executor"}
    decode_many(placer, "fp32", [1000] * 10, Recorder())
    assert placer.inline("fp32", 10, 1000)
    assert not placer.inline("fp32", 10, MAX_INLINE_BYTES + 1)


def test_the_claimed_token_count_not_the_size_predicts_the_cost(executor: ThreadPoolExecutor) -> None:
    placer = DecodePlacer(executor, inline_budget_s=2e-3)
    decode_many(placer, "hyperprior", [80] * 10, Recorder(seconds=0.0005), tokens=10)
    assert placer.inline("hyperprior", 10, 80)
    # As few bytes claiming 512 tokens: about 25 ms to decode, so never on the event loop.
    assert not placer.inline("hyperprior", 512, 80)


def test_refused_payloads_teach_nothing(executor: ThreadPoolExecutor) -> None:
    placer = DecodePlacer(executor)
    decode_many(placer, "int8-zstd", [100_000] * 20, Recorder(fail=True))
    assert placer.predicted_seconds("int8-zstd", 1000) is None


def test_errors_reach_the_caller_from_either_place(executor: ThreadPoolExecutor) -> None:
    placer = DecodePlacer(executor)
    decode_many(placer, "fp32", [10] * 10, Recorder())
    assert placer.inline("fp32", 10, 10)
    with pytest.raises(ValueError, match="malformed"):
        asyncio.run(placer.run("fp32", 10, 10, functools.partial(Recorder(fail=True), bytes(10))))
    with pytest.raises(ValueError, match="malformed"):
        asyncio.run(placer.run("new-codec", 10, 10, functools.partial(Recorder(fail=True), bytes(10))))
