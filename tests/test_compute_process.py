"""The back half in a child process: same answers as in-process, errors reported, a dead child replaced."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from splitwire.cloud.back import BackHalf, BackJob
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


def test_a_failing_batch_is_reported_and_the_child_goes_on(process: ComputeProcess, tiny_bert: LoadedModel) -> None:
    cut = Cut(tiny_bert.num_blocks, 2)
    with pytest.raises(ComputeProcessError, match="batch failed in the compute process"):
        process.run(cut, jobs(width=7))  # wrong width
    assert len(process.run(cut, jobs())) == 3


def test_a_dead_child_is_replaced_before_the_next_batch(process: ComputeProcess, tiny_bert: LoadedModel) -> None:
    first = process.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process.pid == first and time.monotonic() < deadline:
        time.sleep(0.01)
    answers = process.run(Cut(tiny_bert.num_blocks, 2), jobs())
    assert len(answers) == 3 and process.pid not in (None, first)


def test_a_model_that_does_not_load_is_reported() -> None:
    child = ComputeProcess("no-such-model", torch_threads=1)
    child.spawn()
    with pytest.raises(ComputeProcessError, match="could not load no-such-model: UnknownModelError"):
        child.wait_ready()
    child.close()
