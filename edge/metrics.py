"""The edge agent's Prometheus metrics: the only module-level state on this side."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
)  # fmt: skip

STAGE_LATENCY = Histogram(
    "splitwire_edge_stage_duration_seconds",
    "Edge-side latency by stage (front compute, encode, round trip, total).",
    ["model", "codec", "stage"],
    buckets=_LATENCY_BUCKETS,
)
PAYLOAD_BYTES = Histogram(
    "splitwire_edge_payload_bytes",
    "Size of sent payloads (container header included).",
    ["model", "codec"],
    buckets=tuple(float(2**i) for i in range(4, 25)),
)
BITS_PER_TOKEN = Histogram(
    "splitwire_edge_bits_per_token",
    "Payload bits per input token (before token dropping).",
    ["model", "codec"],
    buckets=(4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096, 8192, 16384, 32768),
)
REQUESTS = Counter(
    "splitwire_edge_requests_total",
    "Requests sent to the cloud, by gRPC status code of the answer.",
    ["code"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "splitwire_edge_time_to_first_token_seconds",
    "Generation: from the prompt (before tokenizing) to the first new token received.",
    ["model", "codec"],
    buckets=_LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "splitwire_edge_inter_token_latency_seconds",
    "Generation: between consecutive tokens received (front step, encode and round trip).",
    ["model", "codec"],
    buckets=_LATENCY_BUCKETS,
)

# splitwire-edge serve
API_REQUESTS = Counter(
    "splitwire_edge_api_requests_total",
    "Calls to the agent's local HTTP API, by route and HTTP status.",
    ["route", "status"],
)
CONNECT_ATTEMPTS = Counter(
    "splitwire_edge_connect_attempts_total",
    "Attempts to settle the connection with the cloud at start (retried with backoff), by result.",
    ["result"],
)
CLOUD_READY = Gauge(
    "splitwire_edge_cloud_ready",
    "1 while the channel to the cloud is READY (at least one replica connected), 0 otherwise.",
)
