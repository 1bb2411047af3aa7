"""gRPC settings both sides must agree on, defined once: message limits, keepalive, metadata keys.

Plain values only (no grpc import), so edge, cloud and benchmarks build their channels and servers
from the same numbers.
"""

from __future__ import annotations

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9464
DEFAULT_EDGE_METRICS_PORT = 9465

# Largest message either side accepts. A 256-token MiniLM request in fp32 is about 400 KB; a long
# decoder prompt in fp32 can reach megabytes.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

DEFAULT_TIMEOUT_SECONDS = 30.0

# Metadata each request carries so the server can refuse a peer holding different weights. HTTP/2
# header compression sends repeated values in a byte or two.
MODEL_FINGERPRINT_KEY = "splitwire-model-fingerprint"
CODEC_FINGERPRINT_KEY = "splitwire-codec-fingerprint"

SERVICE_NAME = "splitwire.v1.SplitInference"

_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int | str]]:
    """Options for a client channel."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        *_KEEPALIVE,
    ]


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int | str]]:
    """Options for a server; accepts the clients' keepalive pings."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        *_KEEPALIVE,
    ]
