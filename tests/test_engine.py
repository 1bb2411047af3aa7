"""The engine's dynamic batching: sequences of different lengths (and with dropped tokens) padded into one
batch with masks give the same answers as each sequence run alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from splitwire.cloud.config import ComputeMode, ServerConfig
from splitwire.cloud.engine import InferenceEngine, InferenceResult
from splitwire.cloud.errors import Overloaded


def payloads(engine: InferenceEngine, codec_name: str = "fp32") -> list[bytes]:
    """Sequences of 3 to 17 tokens, two of them with tokens dropped (non-contiguous positions)."""
    assert engine.model is not None and engine.catalog is not None
    codec = engine.catalog.get(codec_name)
    generator = torch.Generator().manual_seed(4)
    out = []
    for tokens in (3, 17, 8, 1, 12):
        out.append(codec.encode_payload(torch.randn(tokens, engine.model.hidden_size, generator=generator)))
    for tokens, kept in ((9, [0, 2, 3, 7]), (14, [0, 1, 5, 6, 7, 8, 13])):
        mask = np.zeros(tokens, dtype=bool)
        mask[kept] = True
        hidden = torch.randn(len(kept), engine.model.hidden_size, generator=generator)
        out.append(codec.encode_payload(hidden, token_mask=mask))
    return out


def run(engine: InferenceEngine, batched: bool) -> list[InferenceResult]:
    async def scenario() -> list[InferenceResult]:
        engine.start()
        try:
            cut, codec = engine.resolve("", None, "fp32")
            jobs = [engine.infer(cut, codec, payload, None) for payload in payloads(engine)]
            if batched:
                return list(await asyncio.gather(*jobs))
            return [await job for job in jobs]
        finally:
            await engine.stop()

    return asyncio.run(scenario())


@pytest.fixture(scope="module", params=["tiny-bert", "tiny-llama"])
def engine_name(request) -> str:
    return request.param


def fresh_engine(name: str, compute: ComputeMode = ComputeMode.THREAD, **options: object) -> InferenceEngine:
    config = ServerConfig(model=name, metrics_port=None, max_queue_delay_ms=30.0, compute=compute, **options)
    engine = InferenceEngine(config)
    engine.load()
    return engine


def test_batched_answers_equal_unbatched_ones(engine_name: str) -> None:
    alone = run(fresh_engine(engine_name), batched=False)
    together = run(fresh_engine(engine_name), batched=True)
    assert [r.batch_size for r in alone] == [1] * len(alone)
    assert [r.batch_size for r in together] == [len(together)] * len(together)
    for a, b in zip(alone, together, strict=True):
        assert a.header.tokens == b.header.tokens
        if a.answer.embedding is not None:
            np.testing.assert_allclose(a.answer.embedding, b.answer.embedding, atol=1e-5)
        else:
            assert a.answer.token_id == b.answer.token_id
            assert a.answer.token_logprob == pytest.approx(b.answer.token_logprob, abs=1e-4)


def test_the_compute_process_answers_like_the_compute_thread() -> None:
    alone = run(fresh_engine("tiny-bert"), batched=False)
    together = run(fresh_engine("tiny-bert", compute=ComputeMode.PROCESS), batched=True)
    assert together[0].batch_size == len(together)
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_allclose(a.answer.embedding, b.answer.embedding, atol=1e-5)


def test_admission_is_bounded_before_decoding() -> None:
    engine = fresh_engine("tiny-bert", max_queue=2, max_batch_size=1)

    async def scenario() -> list[object]:
        engine.start()
        try:
            cut, codec = engine.resolve("", None, "fp32")
            payload = payloads(engine)[1]
            jobs = [engine.infer(cut, codec, payload, None) for _ in range(20)]
            return list(await asyncio.gather(*jobs, return_exceptions=True))
        finally:
            await engine.stop()

    outcomes = asyncio.run(scenario())
    refused = [o for o in outcomes if isinstance(o, Overloaded)]
    served = [o for o in outcomes if isinstance(o, InferenceResult)]
    assert len(refused) + len(served) == 20
    # All 20 arrive in one tick: two are admitted (decoding), the rest are refused before decoding.
    assert len(served) == 2 and "server queue is full (2 requests waiting)" in str(refused[0])


@pytest.mark.parametrize("compute", [ComputeMode.THREAD, ComputeMode.PROCESS])
def test_a_payload_that_does_not_decode_fails_alone_in_its_batch(compute: ComputeMode) -> None:
    from splitwire.cloud.errors import InvalidInput

    engine = fresh_engine("tiny-bert", compute=compute)

    async def scenario() -> list[object]:
        engine.start()
        try:
            cut, codec = engine.resolve("", None, "fp32")
            good = payloads(engine)[:3]
            broken = good[1][:-4]  # the header parses; the body is a token short, found when decoding
            jobs = [engine.infer(cut, codec, payload, None) for payload in (good[0], broken, good[2])]
            return list(await asyncio.gather(*jobs, return_exceptions=True))
        finally:
            await engine.stop()

    first, broken, last = asyncio.run(scenario())
    assert isinstance(broken, InvalidInput) and "malformed payload for codec fp32" in str(broken)
    assert isinstance(first, InferenceResult) and isinstance(last, InferenceResult)
    assert first.batch_size == last.batch_size == 3  # decoded in the batch, beside the one that failed
    assert first.decode_s > 0 and first.answer.embedding is not None


def test_a_decoder_bug_fails_only_the_payloads_that_trip_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # A batch's payloads decode together; when that raises something other than BitstreamError, they
    # are decoded again one at a time, so only the one that trips the bug fails (as a RuntimeError).
    from splitwire.cloud.back import BackHalf, CodedJob

    engine = fresh_engine("tiny-bert")
    assert engine.model is not None and engine.catalog is not None
    codec = engine.catalog.get("fp32")
    jobs = [CodedJob("fp32", *codec.parse_payload(payload)) for payload in payloads(engine)[:3]]
    real_decode_body = type(codec).decode_body

    def buggy(self, header, body):  # type: ignore[no-untyped-def]
        if bytes(body) == bytes(jobs[1].body):
            raise ZeroDivisionError("a bug")
        return real_decode_body(self, header, body)

    monkeypatch.setattr(type(codec), "decode_body", buggy)
    first, broken, last = BackHalf(engine.model, engine.catalog).run_coded(engine.default_cut(), jobs)
    assert isinstance(broken, RuntimeError) and "decoding with fp32 failed: ZeroDivisionError: a bug" in str(broken)
    assert first.embedding is not None and last.embedding is not None  # type: ignore[union-attr]
