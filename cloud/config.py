"""The cloud server's configuration: one typed object, built by the entry point."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

from splitwire.split.models import DEFAULT_MODEL
from splitwire.split.security import ServerTls
from splitwire.split.transport import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_METRICS_PORT, DEFAULT_PORT


class ComputeMode(enum.Enum):
    """Where the back half runs."""

    PROCESS = "process"  # a child process: compute and the event loop do not share a GIL (production)
    THREAD = "thread"  # a thread of the server process: starts faster; for tests and tiny models

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 picks a free port
    metrics_port: int | None = DEFAULT_METRICS_PORT  # 0 picks a free port, None disables /metrics
    health_port: int | None = None  # a plaintext port with grpc.health.v1 only (for probes); 0 picks one
    model: str = DEFAULT_MODEL
    split: int | None = None  # default split for requests that name none; None: the model's own
    codec: str | None = None  # default codec for requests that name none; None: the catalog's
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue: int = 256  # requests admitted and waiting (decode or batch queue) before RESOURCE_EXHAUSTED
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_tokens: int | None = None  # None: the model's own limit
    max_sessions: int = 64  # concurrently open InferStream streams (generation sessions among them)
    session_idle_timeout_s: float = 120.0  # a stream sending nothing this long is closed and its state freed
    grace_seconds: float = 10.0
    torch_threads: int | None = None  # None: leave torch's setting alone (the CLI passes default_torch_threads())
    decode_threads: int = 1  # threads decoding generation steps too costly for the event loop
    compute: ComputeMode = ComputeMode.PROCESS
    tls_cert: Path | None = None  # PEM; with tls_key, the server speaks TLS only
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM; clients must present a certificate signed by it (mutual TLS)
    auth_token_file: Path | None = None  # first line: the bearer token every SplitInference call must carry

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_message_bytes", "max_sessions", "decode_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_tokens", "torch_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or unset), got {value}")
        if not self.session_idle_timeout_s > 0:
            raise ValueError(f"session_idle_timeout must be above 0 seconds, got {self.session_idle_timeout_s}")
        if self.max_queue_delay_ms < 0 or self.grace_seconds < 0:
            raise ValueError("max_queue_delay_ms and grace_seconds must not be negative")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both for TLS, or neither for plaintext")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs the server's own --tls-cert and --tls-key")

    @property
    def tls(self) -> ServerTls | None:
        """The TLS settings, None for a plaintext server."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return ServerTls(self.tls_cert, self.tls_key, self.tls_client_ca)


def default_torch_threads() -> int:
    """Torch threads for the back half when none are asked for: every core but one, which is left to
    the event loop, gRPC and decoding (sharing all cores with them costs more than the extra thread gains)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)
