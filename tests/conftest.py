"""Shared fixtures: loaded models (once per session) and a real cloud server on a loopback port."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from splitwire.cloud.config import ServerConfig
from splitwire.cloud.server import CloudServer
from splitwire.split.models import LoadedModel, load_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"

# Two cores on CI: keep torch from oversubscribing them when pytest runs servers in threads.
torch.set_num_threads(min(2, os.cpu_count() or 1))


class ServerThread:
    """A CloudServer on its own event loop in a background thread, listening on a free loopback port."""

    def __init__(self, config: ServerConfig) -> None:
        self.server = CloudServer(config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cloud-server", daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.call(self.server.start())
        return self

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
    config = ServerConfig(port=0, metrics_port=0, model="all-MiniLM-L6-v2", max_queue_delay_ms=1.0)
    with ServerThread(config) as running:
        yield running
