"""The cloud server's Prometheus metrics: the only module-level state on this side.

Histograms, not summaries, so p99 can be aggregated across replicas. Labels stay low-cardinality:
``model``, ``codec``, ``stage``, ``method``, ``code``, ``reason``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
_BYTES_BUCKETS = tuple(float(2**i) for i in range(4, 25))  # 16 B .. 16 MiB
_BITS_PER_TOKEN_BUCKETS = (
    4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096, 8192, 16384, 32768,
)  # fmt: skip

STAGES = ("decode", "queue", "compute", "total")

REQUEST_LATENCY = Histogram(
    "splitwire_cloud_request_duration_seconds",
    "Server-side latency of an inference request, by stage (decode, queue, compute, total).",
    ["model", "codec", "stage"],
    buckets=_LATENCY_BUCKETS,
)
PAYLOAD_BYTES = Histogram(
    "splitwire_cloud_payload_bytes",
    "Size of received payloads (container header included).",
    ["model", "codec"],
    buckets=_BYTES_BUCKETS,
)
BITS_PER_TOKEN = Histogram(
    "splitwire_cloud_bits_per_token",
    "Payload bits per input token (before token dropping).",
    ["model", "codec"],
    buckets=_BITS_PER_TOKEN_BUCKETS,
)
REQUESTS = Counter(
    "splitwire_cloud_requests_total",
    "Finished RPCs by method and gRPC status code.",
    ["method", "code"],
)
REJECTED = Counter(
    "splitwire_cloud_rejected_requests_total",
    "Requests refused before compute, by reason.",
    ["reason"],
)
IN_FLIGHT = Gauge(
    "splitwire_cloud_in_flight_requests",
    "Inference requests being decoded, queued or computed.",
)
BATCH_SIZE = Histogram(
    "splitwire_cloud_batch_size",
    "Sequences per batch run by the back half.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
COMPUTE_BUSY = Counter(
    "splitwire_cloud_compute_busy_seconds",
    "Wall-clock seconds the back half spent on work, decoding included, by work: batches (of Infer requests, "
    "in the compute process) and generation (steps, on the server's compute thread). The rate of each is its "
    "worker's utilisation, 1 when it never waits for work (with --compute thread the two share one thread).",
    ["model", "work"],
)
QUEUE_DEPTH = Gauge(
    "splitwire_cloud_queue_depth",
    "Requests admitted and waiting: being decoded or queued for a batch (bounded by --max-queue).",
)
OPEN_SESSIONS = Gauge(
    "splitwire_cloud_open_sessions",
    "Open InferStream sessions (bounded by --max-sessions).",
)
GENERATION_SESSIONS = Gauge(
    "splitwire_cloud_generation_sessions",
    "Generation sessions holding a back-half KV cache (a subset of the open sessions).",
    ["model"],
)
GENERATION_ENDED = Counter(
    "splitwire_cloud_generation_sessions_ended_total",
    "Generation sessions ended, by reason: stop_token, max_new_tokens, cancelled (the client cancelled, "
    "disconnected or closed its side early), idle_timeout, error. Every end frees the session's KV cache.",
    ["model", "reason"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "splitwire_cloud_time_to_first_token_seconds",
    "Generation: from receiving the prompt's hidden states to sending the first new token.",
    ["model", "codec"],
    buckets=_LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "splitwire_cloud_inter_token_latency_seconds",
    "Generation: between sending consecutive tokens of a session (the edge's front step and the network "
    "round trip included).",
    ["model", "codec"],
    buckets=_LATENCY_BUCKETS,
)
MODEL_READY = Gauge(
    "splitwire_cloud_model_ready",
    "1 when the model is loaded and warm, 0 otherwise.",
    ["model"],
)
CODEC_EXPECTED_BITS_PER_TOKEN = Gauge(
    "splitwire_cloud_codec_expected_bits_per_token",
    "Bits per token a codec spends on its dev set (from its manifest), for codecs that state one: the "
    "reference a drift alert compares splitwire_cloud_bits_per_token against.",
    ["model", "codec"],
)
