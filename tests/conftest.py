"""Shared fixtures: loaded models (once per session) and a real cloud server on a loopback port."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from splitwire.cloud.config import ComputeMode, ServerConfig
from splitwire.cloud.server import CloudServer
from splitwire.codec.raw import Fp32Codec
from splitwire.split.models import LoadedModel, load_model
from splitwire.v1 import splitwire_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
BIN = Path(sys.executable).parent

# Two cores on CI: keep torch from oversubscribing them when pytest runs servers in threads.
torch.set_num_threads(min(2, os.cpu_count() or 1))


class ServerThread:
    """A CloudServer on its own event loop in a background thread, listening on a free loopback port."""

    def __init__(self, config: ServerConfig) -> None:
        self.server = CloudServer(config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cloud-server", daemon=True)

    def __enter__(self) -> ServerThread:
        self.begin().result(120)
        return self

    def begin(self) -> concurrent.futures.Future:
        """Start the loop thread and the server; the future completes once the model is warm."""
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self.server.start(), self.loop)

    def __exit__(self, *exc: object) -> None:
        self.call(self.server.stop(grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    def call(self, coroutine, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"


def start_serving_process(command: list[object], announcement: str) -> tuple[subprocess.Popen, re.Match]:
    """Start ``command`` and read its first line, which must match ``announcement`` (the program says where
    it listens): the process and the match. Kills the process and fails with its output otherwise."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    match = re.search(announcement, line)
    if not match:
        process.kill()
        raise AssertionError(f"{command[0]} did not start: {line}{process.stderr.read()}")
    return process, match


def start_cloud_process(*args: str) -> tuple[subprocess.Popen, str]:
    """``splitwire-cloud serve`` on a free loopback port as its own process, once it says it is serving:
    the process and its ``HOST:PORT``. Extra ``args`` go to serve; the caller kills the process."""
    command = [BIN / "splitwire-cloud", "serve", "--port", "0", "--metrics-port", "0", "--threads", "1", *args]
    process, match = start_serving_process(command, r"serving on ([\d.]+:\d+), metrics on port (\d+)")
    process.metrics_port = int(match.group(2))  # type: ignore[attr-defined]
    return process, match.group(1)


def tiny_bert_request(tokens: int = 5, seed: int = 0) -> pb.InferRequest:
    """A well-formed request for tiny-bert (width 32): seeded hidden states at split 2, coded fp32."""
    hidden = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(seed))
    payload = Fp32Codec("fp32", 32).encode_payload(hidden)
    return pb.InferRequest(model="tiny-bert", split=2, codec="fp32", payload=payload)


@pytest.fixture(scope="session")
def minilm() -> LoadedModel:
    return load_model("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def tiny_bert() -> LoadedModel:
    return load_model("tiny-bert")


@pytest.fixture(scope="session")
def tiny_llama() -> LoadedModel:
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def minilm_server() -> Iterator[ServerThread]:
    config = ServerConfig(
        port=0, metrics_port=0, model="all-MiniLM-L6-v2", max_queue_delay_ms=1.0, compute=ComputeMode.THREAD
    )
    with ServerThread(config) as running:
        yield running
