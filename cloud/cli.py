"""``splitwire-cloud``: the cloud server's entry point. Logging and signal handling live here only."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from splitwire.cloud.config import ServerConfig
from splitwire.cloud.server import CloudServer
from splitwire.split.models import DEFAULT_MODEL, MODELS
from splitwire.split.transport import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_METRICS_PORT, DEFAULT_PORT

log = logging.getLogger("splitwire.cloud")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitwire-cloud",
        description="Serve the back half of a split transformer over gRPC.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the gRPC server",
        description="Decode payloads from edge agents, run blocks [split, L) and the head, answer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port (0 picks a free one)")
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help="Prometheus /metrics port; -1 disables it",
    )
    serve.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model name ({', '.join(MODELS)}) or a folder holding a Hugging Face model",
    )
    serve.add_argument("--split", type=int, default=None, help="default split point (default: the model's)")
    serve.add_argument("--codec", default=None, help="default codec for requests that name none")
    serve.add_argument("--max-batch-size", type=int, default=32, help="most sequences per back-half batch")
    serve.add_argument(
        "--max-queue-delay-ms", type=float, default=2.0, help="longest a request waits for a batch to fill"
    )
    serve.add_argument("--max-queue", type=int, default=256, help="queued requests before RESOURCE_EXHAUSTED")
    serve.add_argument(
        "--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES, help="largest request accepted"
    )
    serve.add_argument("--max-tokens", type=int, default=None, help="most tokens per request (default: model's)")
    serve.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get on shutdown")
    serve.add_argument("--threads", type=int, default=None, help="torch compute threads (default: torch's)")
    serve.add_argument("--log-level", default="INFO", help="logging level")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        model=args.model,
        split=args.split,
        codec=args.codec,
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms,
        max_queue=args.max_queue,
        max_message_bytes=args.max_message_bytes,
        max_tokens=args.max_tokens,
        grace_seconds=args.grace,
        torch_threads=args.threads,
    )


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain within the grace period."""
    server = CloudServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(
        f"splitwire-cloud serving on {config.host}:{server.port}, metrics on port {server.metrics_port}",
        flush=True,
    )
    await stop.wait()
    log.info("signal received; draining for up to %.1f s", config.grace_seconds)
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(serve(config_from_args(args)))
    except (ValueError, LookupError, OSError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
