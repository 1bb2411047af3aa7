"""The back half in a child process: same answers as in-process, errors reported, a dead child replaced."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from splitwire.cloud.back import BackHalf, BackJob, CodedJob
from splitwire.cloud.compute_process import ComputeProcess, ComputeProcessError
from splitwire.split.cut import Cut
from splitwire.split.models import LoadedModel


def jobs(width: int = 32) -> list[BackJob]:
    generator = torch.Generator().manual_seed(1)
    return [BackJob(torch.randn(n, width, generator=generator), torch.arange(n)) for n in (3, 9, 5)]


@pytest.fixture(scope="module")
def process(tiny_bert: LoadedModel) -> Iterator[ComputeProcess]:
    child = ComputeProcess("tiny-bert", torch_threads=1)
    child.spawn()
    child.wait_ready(tiny_bert.fingerprint)
    yield child
    child.close()
    assert child.pid is None


def test_answers_equal_the_in_process_ones(process: ComputeProcess, tiny_bert: LoadedModel) -> None:
    cut = Cut(tiny_bert.num_blocks, 2)
    expected = BackHalf(tiny_bert).run(cut, jobs())
    for got, want in zip(process.run(cut, jobs()), expected, strict=True):
        np.testing.assert_allclose(got.embedding, want.embedding, atol=1e-6)


def test_each_batch_reports_its_busy_time(process: ComputeProcess, tiny_bert: LoadedModel) -> None:
    seen: list[float] = []
    process.on_busy = seen.append
    try:
        started = time.monotonic()
        process.run(Cut(tiny_bert.num_blocks, 2), jobs())
        process.run(Cut(tiny_bert.num_blocks, 2), jobs())
        elapsed = time.monotonic() - started
    finally:
        process.on_busy = None
    assert len(seen) == 2 and all(seconds > 0 for seconds in seen) and sum(seen) < elapsed


def test_a_failing_busy_callback_does_not_stop_the_answers(process: ComputeProcess, tiny_bert: LoadedModel) -> None:
    def broken(seconds: float) -> None:
        raise RuntimeError("metrics backend down")

    process.on_busy = broken
    try:
        assert len(process.submit(Cut(tiny_bert.num_blocks, 2), jobs()).result(timeout=30)) == 3
        assert len(process.submit(Cut(tiny_bert.num_blocks, 2), jobs()).result(timeout=30)) == 3
    finally:
        process.on_busy = None


def test_a_failing_batch_is_reported_and_the_child_goes_on(process: ComputeProcess, tiny_bert: LoadedModel) -> None:
    cut = Cut(tiny_bert.num_blocks, 2)
    seen: list[float] = []
    process.on_busy = seen.append
    try:
        with pytest.raises(ComputeProcessError, match="batch failed in the compute process"):
            process.run(cut, jobs(width=7))  # wrong width
    finally:
        process.on_busy = None
    assert len(seen) == 1 and seen[0] > 0  # the child was busy with it until it failed
    assert len(process.run(cut, jobs())) == 3


def test_batches_submitted_together_are_answered_in_order(process: ComputeProcess, tiny_bert: LoadedModel) -> None:
    # Many batches in the pipe at once, some failing: each future gets its own batch's answers.
    cut = Cut(tiny_bert.num_blocks, 2)
    generator = torch.Generator().manual_seed(2)
    batches = [
        [BackJob(torch.randn(n, 7 if b % 3 == 1 else 32, generator=generator), torch.arange(n)) for n in (2 + b, 4)]
        for b in range(9)
    ]
    futures = [process.submit(cut, batch) for batch in batches]
    local = BackHalf(tiny_bert)
    for b, (batch, future) in enumerate(zip(batches, futures, strict=True)):
        if b % 3 == 1:  # wrong width
            with pytest.raises(ComputeProcessError, match="batch failed in the compute process"):
                future.result(timeout=60)
            continue
        for got, want in zip(future.result(timeout=60), local.run(cut, batch), strict=True):
            np.testing.assert_allclose(got.embedding, want.embedding, atol=1e-6)


def test_a_dead_child_is_replaced_before_the_next_batch(process: ComputeProcess, tiny_bert: LoadedModel) -> None:
    first = process.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process.pid == first and time.monotonic() < deadline:
        time.sleep(0.01)
    answers = process.run(Cut(tiny_bert.num_blocks, 2), jobs())
    assert len(answers) == 3 and process.pid not in (None, first)


def test_coded_jobs_are_decoded_in_the_child(process: ComputeProcess, tiny_bert: LoadedModel) -> None:
    from splitwire.codec.catalog import CodecCatalog
    from splitwire.codec.errors import BitstreamError

    catalog = CodecCatalog.for_model(tiny_bert.fingerprint, tiny_bert.hidden_size)
    codec = catalog.get("fp16")
    coded = []
    for job in jobs():
        header, body = codec.parse_payload(codec.encode_payload(job.hidden))
        coded.append(CodedJob("fp16", header, bytes(body)))
    coded[1] = CodedJob("fp16", coded[1].header, coded[1].body[:-2])  # one token value short
    cut = Cut(tiny_bert.num_blocks, 2)
    expected = BackHalf(tiny_bert, catalog).run_coded(cut, coded)
    got = process.run_coded(cut, coded)
    assert isinstance(got[1], BitstreamError) and isinstance(expected[1], BitstreamError)
    for index in (0, 2):
        np.testing.assert_allclose(got[index].embedding, expected[index].embedding, atol=1e-6)
        assert got[index].decode_s > 0


def test_a_child_whose_codecs_differ_is_refused(tiny_bert: LoadedModel) -> None:
    from splitwire.codec.catalog import CodecCatalog

    catalog = CodecCatalog.for_model(tiny_bert.fingerprint, tiny_bert.hidden_size, vocab_size=tiny_bert.vocab_size)
    expected = {codec.name: codec.fingerprint() for codec in catalog}
    child = ComputeProcess("tiny-bert", torch_threads=1)
    child.spawn()
    with pytest.raises(ComputeProcessError, match=r"codecs that differ from the server's \(fp16\)"):
        child.wait_ready(tiny_bert.fingerprint, {**expected, "fp16": "not-its-fingerprint"})
    child.close()


def test_a_model_that_does_not_load_is_reported() -> None:
    child = ComputeProcess("no-such-model", torch_threads=1)
    child.spawn()
    with pytest.raises(ComputeProcessError, match="could not load no-such-model: UnknownModelError"):
        child.wait_ready()
    child.close()
