"""``splitwire-cloud``: the cloud server's entry point. Logging and signal handling live here only.

Every ``serve`` option can be given as a flag, as an environment variable ``SPLITWIRE_CLOUD_<OPTION>``
or in a TOML file (``--config``), in that order of precedence (see :mod:`splitwire.split.settings`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from splitwire.cloud import probe
from splitwire.cloud.config import ComputeMode, ServerConfig, default_torch_threads
from splitwire.cloud.server import CloudServer
from splitwire.split.models import MODELS
from splitwire.split.settings import Option, OptionSet

log = logging.getLogger("splitwire.cloud")

_DEFAULT = ServerConfig()

SERVE_OPTIONS = OptionSet(
    env_prefix="SPLITWIRE_CLOUD",
    table="server",
    options=(
        Option("--host", str, _DEFAULT.host, "address to listen on (0.0.0.0 for every interface)", "HOST"),
        Option("--port", int, _DEFAULT.port, "gRPC port (0 picks a free one)", "PORT"),
        Option("--metrics-port", int, _DEFAULT.metrics_port, "Prometheus /metrics port; -1 disables it", "PORT"),
        Option(
            "--health-port",
            int,
            None,
            "an extra plaintext port serving only grpc.health.v1, for probes that cannot speak TLS (Kubernetes' "
            "native gRPC probes); none: health is on the gRPC port only",
            "PORT",
        ),
        Option(
            "--model",
            str,
            _DEFAULT.model,
            f"model name ({', '.join(MODELS)}) or a folder holding a Hugging Face model",
            "NAME|PATH",
        ),
        Option("--split", int, None, "default split point for requests that name none (none: the model's)", "K"),
        Option("--codec", str, None, "default codec for requests that name none (none: the catalog's)", "NAME"),
        Option("--max-batch-size", int, _DEFAULT.max_batch_size, "most sequences the back half runs in one batch", "N"),
        Option(
            "--max-queue-delay-ms",
            float,
            _DEFAULT.max_queue_delay_ms,
            "longest a request waits for more requests to fill its batch, in ms",
            "MS",
        ),
        Option(
            "--max-queue",
            int,
            _DEFAULT.max_queue,
            "requests waiting (decoding or queued) before more are refused with RESOURCE_EXHAUSTED",
            "N",
        ),
        Option(
            "--max-message-bytes",
            int,
            _DEFAULT.max_message_bytes,
            "largest request accepted; larger ones get RESOURCE_EXHAUSTED 'Received message larger than max'",
            "BYTES",
        ),
        Option(
            "--max-tokens",
            int,
            None,
            "most tokens a payload may declare (none: the model's limit); more get INVALID_ARGUMENT",
            "N",
        ),
        Option(
            "--max-sessions",
            int,
            _DEFAULT.max_sessions,
            "InferStream streams open at once, generation sessions included; more are refused with RESOURCE_EXHAUSTED",
            "N",
        ),
        Option(
            "--session-idle-timeout",
            float,
            _DEFAULT.session_idle_timeout_s,
            "seconds an InferStream stream (a generation session) may send nothing before the server closes "
            "it with DEADLINE_EXCEEDED and frees its KV cache",
            "SECONDS",
        ),
        Option(
            "--grace",
            float,
            _DEFAULT.grace_seconds,
            "seconds in-flight requests get to finish after SIGTERM",
            "SECONDS",
        ),
        Option(
            "--threads",
            int,
            None,
            "torch threads for the back half (none: every core but one, left to gRPC and decoding)",
            "N",
        ),
        Option(
            "--decode-threads",
            int,
            _DEFAULT.decode_threads,
            "threads decoding generation steps too costly for the event loop",
            "N",
        ),
        Option(
            "--compute",
            ComputeMode,
            _DEFAULT.compute,
            "where the back half runs: 'process' (a child process, so model code and gRPC do not share "
            "the GIL) or 'thread' (in the server process; starts faster)",
            "{process,thread}",
        ),
        Option(
            "--tls-cert",
            Path,
            None,
            "PEM server certificate (chain); with --tls-key the server speaks TLS only",
            "FILE",
        ),
        Option("--tls-key", Path, None, "PEM private key of --tls-cert", "FILE"),
        Option(
            "--tls-client-ca",
            Path,
            None,
            "PEM CA certificate; clients must present a certificate it signed (mutual TLS)",
            "FILE",
        ),
        Option(
            "--auth-token-file",
            Path,
            None,
            "file whose first line is the bearer token every inference call must carry (health and "
            "reflection need none)",
            "FILE",
        ),
        Option("--log-level", str, "INFO", "logging level (DEBUG, INFO, WARNING, ERROR)", "LEVEL"),
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitwire-cloud",
        description="Serve the back half of a split transformer over gRPC.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the gRPC server",
        description="Decode payloads from edge agents, run blocks [split, L) and the head, answer. Each "
        "option below can also be set by its environment variable or in a TOML file (--config); "
        "precedence: flag > environment > file > default.",
    )
    SERVE_OPTIONS.add_to(serve)
    health = sub.add_parser(
        "health",
        help="ask a server's grpc.health.v1 service whether it serves; exit 0 if SERVING (container health checks)",
        description="Exit status 0 when the server answers SERVING, 1 when it answers otherwise (loading, "
        "draining) or cannot be reached within --timeout. Prints the status.",
    )
    probe.HEALTH_OPTIONS.add_to(health)
    return parser


def config_from_values(values: dict[str, object]) -> ServerConfig:
    """The typed configuration from resolved option values. Raises ValueError on inconsistent ones."""
    metrics_port = values["metrics_port"]
    return ServerConfig(
        host=values["host"],
        port=values["port"],
        metrics_port=None if metrics_port is None or metrics_port < 0 else metrics_port,
        health_port=values["health_port"],
        model=values["model"],
        split=values["split"],
        codec=values["codec"],
        max_batch_size=values["max_batch_size"],
        max_queue_delay_ms=values["max_queue_delay_ms"],
        max_queue=values["max_queue"],
        max_message_bytes=values["max_message_bytes"],
        max_tokens=values["max_tokens"],
        max_sessions=values["max_sessions"],
        session_idle_timeout_s=values["session_idle_timeout"],
        grace_seconds=values["grace"],
        torch_threads=values["threads"] or default_torch_threads(),
        decode_threads=values["decode_threads"],
        compute=values["compute"],
        tls_cert=values["tls_cert"],
        tls_key=values["tls_key"],
        tls_client_ca=values["tls_client_ca"],
        auth_token_file=values["auth_token_file"],
    )


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain within the grace period."""
    server = CloudServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    health = f", health on port {server.health_port}" if server.health_port is not None else ""
    print(
        f"splitwire-cloud serving on {config.host}:{server.port}, metrics on port {server.metrics_port}{health}",
        flush=True,
    )
    await stop.wait()
    log.info("signal received; draining for up to %.1f s", config.grace_seconds)
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "health":
        return probe.run(args)
    try:
        values = SERVE_OPTIONS.resolve(args)
        config = config_from_values(values)
        logging.basicConfig(
            level=str(values["log_level"]).upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    except ValueError as exc:
        print(f"splitwire-cloud: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config))
    except (ValueError, LookupError, OSError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
