"""The cloud server's configuration: one typed object, built by the entry point."""

from __future__ import annotations

from dataclasses import dataclass

from splitwire.split.models import DEFAULT_MODEL
from splitwire.split.transport import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_METRICS_PORT, DEFAULT_PORT


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 picks a free port
    metrics_port: int | None = DEFAULT_METRICS_PORT  # 0 picks a free port, None disables /metrics
    model: str = DEFAULT_MODEL
    split: int | None = None  # default split for requests that name none; None: the model's own
    codec: str | None = None  # default codec for requests that name none; None: the catalog's
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue: int = 256
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_tokens: int | None = None  # None: the model's own limit
    grace_seconds: float = 10.0
    torch_threads: int | None = None  # None: torch's default
