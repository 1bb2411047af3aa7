"""Serving under pressure and through its lifecycle: health while loading and draining, SIGTERM with work
in flight, overload, session limits and deadlines. Real servers on loopback ports, tiny-bert inside."""

from __future__ import annotations

import asyncio
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from conftest import ServerThread, tiny_bert_request
from grpc_health.v1 import health_pb2, health_pb2_grpc
from splitwire.cloud.config import ComputeMode, ServerConfig
from splitwire.cloud.interceptors import RETRY_PUSHBACK_KEY
from splitwire.codec.raw import Fp16Codec
from splitwire.edge.agent import EdgeAgent, EdgeConfig, EdgeError
from splitwire.split.transport import SERVICE_NAME, channel_options
from splitwire.v1 import splitwire_pb2 as pb
from splitwire.v1 import splitwire_pb2_grpc as pb_grpc
from test_server import sample, scrape

BIN = Path(sys.executable).parent
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def tiny_server(**options: object) -> ServerThread:
    options.setdefault("compute", ComputeMode.THREAD)
    return ServerThread(ServerConfig(port=0, metrics_port=0, model="tiny-bert", **options))


def health_of(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10, wait_for_ready=True
        )
    return reply.status


def infer(address: str, request: pb.InferRequest, timeout: float = 30) -> pb.InferResponse:
    with grpc.insecure_channel(address, options=channel_options()) as channel:
        return pb_grpc.SplitInferenceStub(channel).Infer(request, timeout=timeout)


def test_health_is_not_serving_until_the_model_is_warm() -> None:
    running = tiny_server()
    loaded = threading.Event()
    real_load = running.server.engine.load

    def slow_load() -> None:
        assert loaded.wait(30)
        real_load()

    running.server.engine.load = slow_load
    started = running.begin()
    try:
        while running.server.port is None:
            time.sleep(0.01)
        assert health_of(running.address) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as caught:
            infer(running.address, tiny_bert_request(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not loaded yet" in caught.value.details()
        loaded.set()
        started.result(60)
        assert health_of(running.address) == SERVING
    finally:
        loaded.set()
        running.__exit__()


def test_draining_reports_not_serving_and_refuses_new_work() -> None:
    with tiny_server() as running:
        assert len(infer(running.address, tiny_bert_request()).embedding.values) == 32
        running.call(running.server.drain())
        assert health_of(running.address) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as caught:
            infer(running.address, tiny_bert_request(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in caught.value.details()


@pytest.fixture
def slow_batching_cloud() -> Iterator[tuple[subprocess.Popen, str, str]]:
    """splitwire-cloud with tiny-bert whose batches wait 1.5 s to fill, so requests stay in flight."""
    process = subprocess.Popen(
        [
            BIN / "splitwire-cloud",
            "serve",
            "--model",
            "tiny-bert",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--threads",
            "1",
            "--max-queue-delay-ms",
            "1500",
            "--max-batch-size",
            "64",
            "--grace",
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline()
    match = re.search(r"serving on ([\d.]+:\d+), metrics on port (\d+)", line)
    assert match, f"server did not start: {line}{process.stderr.read() if process.poll() is not None else ''}"
    yield process, match.group(1), f"http://127.0.0.1:{match.group(2)}/metrics"
    if process.poll() is None:
        process.kill()
        process.wait()


def test_sigterm_finishes_in_flight_requests_then_exits_zero(slow_batching_cloud) -> None:
    process, address, metrics_url = slow_batching_cloud
    requests = [tiny_bert_request(tokens=3 + i, seed=i) for i in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        pending = [pool.submit(infer, address, request) for request in requests]
        deadline = time.monotonic() + 10
        while sample(scrape(metrics_url), "splitwire_cloud_in_flight_requests") < len(requests):
            assert time.monotonic() < deadline, "requests never got in flight"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as caught:  # no longer accepting
            infer(address, requests[0], timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        replies = [future.result(timeout=30) for future in pending]
    assert [r.tokens for r in replies] == [3, 4, 5, 6]
    assert all(len(r.embedding.values) == 32 for r in replies)
    assert process.wait(timeout=30) == 0
    assert "draining" in process.stderr.read()


async def _burst(address: str, count: int) -> list[tuple[grpc.StatusCode, float, dict[str, str]]]:
    """``count`` concurrent Infer calls: (status, seconds, trailing metadata) of each."""
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = pb_grpc.SplitInferenceStub(channel)
        await channel.channel_ready()

        async def one(seed: int) -> tuple[grpc.StatusCode, float, dict[str, str]]:
            started = time.monotonic()
            call = stub.Infer(tiny_bert_request(tokens=8, seed=seed), timeout=30)
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                return exc.code(), time.monotonic() - started, dict(exc.trailing_metadata() or ())
            return grpc.StatusCode.OK, time.monotonic() - started, {}

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def test_overload_answers_resource_exhausted_quickly_while_admitted_requests_complete() -> None:
    with tiny_server(max_queue=1, max_batch_size=1, max_queue_delay_ms=0.0) as running:
        before = scrape(running.metrics_url)
        outcomes = asyncio.run(_burst(running.address, 48))
        after = scrape(running.metrics_url)
        assert len(infer(running.address, tiny_bert_request()).embedding.values) == 32  # still serving
    codes = [code for code, _, _ in outcomes]
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    refused = [(seconds, trailers) for code, seconds, trailers in outcomes if code == exhausted]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.OK) >= 1 and len(refused) >= 10
    assert max(seconds for seconds, _ in refused) < 2.0
    assert all(int(trailers[RETRY_PUSHBACK_KEY]) >= 1 for _, trailers in refused)
    name = "splitwire_cloud_rejected_requests_total"
    assert sample(after, name, reason="queue_full") - sample(before, name, reason="queue_full") == len(refused)
    assert sample(after, "splitwire_cloud_in_flight_requests") == 0


def test_sessions_past_the_limit_are_refused() -> None:
    with (
        tiny_server(max_sessions=1) as running,
        grpc.insecure_channel(running.address, options=channel_options()) as channel,
    ):
        stub = pb_grpc.SplitInferenceStub(channel)
        feed: queue.Queue[pb.InferRequest | None] = queue.Queue()
        first = stub.InferStream(iter(feed.get, None), timeout=30)
        feed.put(tiny_bert_request())
        assert len(next(first).embedding.values) == 32  # the first session is open
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.InferStream(iter([tiny_bert_request()]), timeout=10))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many open sessions (1)" in caught.value.details()
        feed.put(None)
        assert list(first) == []
        (reply,) = stub.InferStream(iter([tiny_bert_request()]), timeout=10)
        assert len(reply.embedding.values) == 32


def test_work_past_its_deadline_is_never_computed() -> None:
    with tiny_server(max_queue_delay_ms=1000.0, max_batch_size=64) as running:
        before = scrape(running.metrics_url)
        with pytest.raises(grpc.RpcError) as caught:
            infer(running.address, tiny_bert_request(), timeout=0.2)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(1.2)  # past the queue delay: the batch would have run by now
        after = scrape(running.metrics_url)
    name = "splitwire_cloud_batch_size_count"
    assert sample(after, name, model="tiny-bert") == sample(before, name, model="tiny-bert")
    assert sample(after, "splitwire_cloud_in_flight_requests") == 0


def test_limits_on_message_size_and_tokens_are_clear(tiny_bert) -> None:
    with tiny_server(max_message_bytes=2000, max_tokens=8) as running:
        with pytest.raises(grpc.RpcError) as caught:  # 20 tokens x 32 channels x 4 bytes: over 2000 bytes
            infer(running.address, tiny_bert_request(tokens=20), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in caught.value.details()
        nine_tokens = Fp16Codec("fp16", 32).encode_payload(torch.randn(9, 32))  # 579 bytes, but 9 tokens
        with pytest.raises(grpc.RpcError) as caught:
            infer(running.address, pb.InferRequest(model="tiny-bert", split=2, codec="fp16", payload=nine_tokens))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "header claims 9 tokens; allowed are 1 to 8" in caught.value.details()
        config = EdgeConfig(server=running.address, model="tiny-bert", codec="fp32")
        with EdgeAgent(config, tiny_bert) as edge, pytest.raises(EdgeError, match="larger than the 2000 bytes"):
            edge.infer("a sentence long enough to need more than two thousand bytes in fp32")
