"""gRPC settings both sides must agree on, defined once: message limits, keepalive, metadata keys, and
how a client spreads calls over a fleet of replicas.

Plain values only (no grpc import), so edge, cloud and benchmarks build their channels and servers
from the same numbers.
"""

from __future__ import annotations

import ipaddress
import json
import socket

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9464
DEFAULT_EDGE_METRICS_PORT = 9465

# Largest message either side accepts. A 256-token MiniLM request in fp32 is about 400 KB; a long
# decoder prompt in fp32 can reach megabytes.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

DEFAULT_TIMEOUT_SECONDS = 30.0

# Attempts per idempotent call (the first included) when a replica answers UNAVAILABLE; gRPC caps it at 5.
DEFAULT_MAX_ATTEMPTS = 4
# Longest wait between reconnection attempts to a replica that is down (gRPC backs off exponentially up to it).
DEFAULT_RECONNECT_BACKOFF_MAX_SECONDS = 10.0

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


def balanced_channel_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    reconnect_backoff_max_s: float = DEFAULT_RECONNECT_BACKOFF_MAX_SECONDS,
) -> list[tuple[str, int | str]]:
    """Options for a channel over a fleet of replicas (see :func:`cloud_target`).

    gRPC's own ``round_robin`` policy keeps a connection to every address the target resolves to and
    sends each call to the next ready one; a replica that goes down, or whose health check says
    NOT_SERVING, leaves the rotation until it is back. Calls that cannot have changed server state
    (``Infer`` and ``GetServerInfo``; never a generation stream) are retried by gRPC on ``UNAVAILABLE``,
    and each retry is picked afresh, so it lands on another replica.
    """
    if not 1 <= max_attempts <= 5:
        raise ValueError(f"max_attempts must be 1 to 5 (gRPC's limit), got {max_attempts}")
    if not reconnect_backoff_max_s > 0:
        raise ValueError(f"the reconnect backoff must be above 0 seconds, got {reconnect_backoff_max_s}")
    method_config: dict[str, object] = {
        "name": [{"service": SERVICE_NAME, "method": "Infer"}, {"service": SERVICE_NAME, "method": "GetServerInfo"}]
    }
    if max_attempts > 1:
        method_config["retryPolicy"] = {
            "maxAttempts": max_attempts,
            "initialBackoff": "0.02s",
            "maxBackoff": "0.5s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    service_config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        # gRPC watches each replica's grpc.health.v1 status and leaves one out of the rotation while it
        # says NOT_SERVING (loading its model, or draining before it stops), before any call fails there.
        "healthCheckConfig": {"serviceName": SERVICE_NAME},
        "methodConfig": [method_config],
    }
    backoff_max_ms = max(1, int(1000 * reconnect_backoff_max_s))
    return [
        *channel_options(max_message_bytes),
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.enable_retries", 1),
        ("grpc.initial_reconnect_backoff_ms", min(250, backoff_max_ms)),
        ("grpc.min_reconnect_backoff_ms", min(250, backoff_max_ms)),
        ("grpc.max_reconnect_backoff_ms", backoff_max_ms),
    ]


def _server_entries(servers: str) -> list[str]:
    """The addresses of a ``--server`` value: comma-separated, blanks ignored."""
    return [entry.strip() for entry in servers.split(",") if entry.strip()]


def fleet_server_name(servers: str) -> str | None:
    """The name TLS must verify for a comma-separated list of replicas: the first entry's host (gRPC would
    otherwise check the certificate against the list's own text). None for a single address or a URI,
    whose host gRPC checks itself. Every replica of a list must present a certificate for this name."""
    entries = _server_entries(servers)
    if len(entries) < 2:
        return None
    return entries[0].rpartition(":")[0].strip("[]")


def cloud_target(servers: str) -> str:
    """The gRPC target for one server or a fleet of replicas.

    ``host:port`` and ``dns:///name:port`` pass through: gRPC's resolver finds every address of the name
    (a Kubernetes headless Service answers with one per ready pod) and re-resolves when connections drop.
    A comma-separated list ``a:50051,b:50051`` becomes one ``ipv4:``/``ipv6:`` target of all the
    addresses its entries resolve to now (a list is resolved once; name a DNS record to follow changes).
    """
    entries = _server_entries(servers)
    if not entries:
        raise ValueError("no server address given: expected HOST:PORT, a comma-separated list, or dns:///NAME:PORT")
    if len(entries) == 1:
        return entries[0]
    addresses: list[str] = []
    for entry in entries:
        if "://" in entry or entry.startswith(("ipv4:", "ipv6:", "unix:")):
            raise ValueError(f"{entry!r}: a list of servers takes plain HOST:PORT entries, not URIs")
        host, sep, port = entry.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"{entry!r} is not HOST:PORT")
        host = host.strip("[]")
        try:
            ips = [str(ipaddress.ip_address(host))]
        except ValueError:
            try:
                found = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise ValueError(f"cannot resolve server {host!r}: {exc.strerror}") from None
            ips = list(dict.fromkeys(str(info[4][0]) for info in found))
            ipv4 = [ip for ip in ips if ":" not in ip]
            ips = ipv4 or ips  # a name like localhost may answer in both families; one target holds one
        addresses += [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]
    families = {"ipv6" if address.startswith("[") else "ipv4" for address in addresses}
    if len(families) > 1:
        raise ValueError(f"servers {servers!r} mix IPv4 and IPv6 addresses; list one family only")
    return f"{families.pop()}:{','.join(addresses)}"


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int | str]]:
    """Options for a server; accepts the clients' keepalive pings."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        *_KEEPALIVE,
    ]
