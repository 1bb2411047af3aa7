"""``splitwire-edge``: run texts through the split, generate with a decoder, or serve local applications.

Connection options can be given as flags, as environment variables ``SPLITWIRE_EDGE_<OPTION>`` or in
a TOML file (``--config``, keys at the top level or under ``[edge]``), in that order of precedence.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

import numpy as np
from splitwire.edge.agent import EdgeAgent, EdgeConfig, EdgeError, EdgeResult, GenerationResult
from splitwire.edge.service import EdgeService, ServiceConfig
from splitwire.split.models import MODELS
from splitwire.split.sampling import SamplingParams
from splitwire.split.security import CLIENT_SECURITY_OPTIONS, client_security
from splitwire.split.settings import Option, OptionSet
from splitwire.split.transport import DEFAULT_EDGE_METRICS_PORT

_DEFAULT = EdgeConfig()

CONNECTION_OPTIONS = OptionSet(
    env_prefix="SPLITWIRE_EDGE",
    table="edge",
    options=(
        Option(
            "--server",
            str,
            _DEFAULT.server,
            "splitwire-cloud address: HOST:PORT, a comma-separated list of replicas, or dns:///NAME:PORT "
            "(every address of the name, e.g. a Kubernetes headless Service); calls go round robin over the "
            "replicas and are retried on another one when a replica is UNAVAILABLE",
            "ADDRESS[,ADDRESS...]",
        ),
        Option(
            "--model", str, _DEFAULT.model, f"model name ({', '.join(MODELS)}) or a Hugging Face folder", "NAME|PATH"
        ),
        Option("--split", int, None, "split point (none: the server's default)", "K"),
        Option("--codec", str, None, "codec name (none: the server's default for the split)", "NAME"),
        Option("--timeout", float, _DEFAULT.timeout_s, "deadline per request, in seconds", "SECONDS"),
        Option(
            "--max-message-bytes",
            int,
            _DEFAULT.max_message_bytes,
            "largest request or answer this agent sends or accepts",
            "BYTES",
        ),
        Option(
            "--max-attempts",
            int,
            _DEFAULT.max_attempts,
            "attempts per inference call (1 to 5) when a replica answers UNAVAILABLE; generation streams are "
            "never retried",
            "N",
        ),
        Option(
            "--reconnect-backoff-max",
            float,
            _DEFAULT.reconnect_backoff_max_s,
            "longest wait between attempts to reconnect to a replica that is down, in seconds",
            "SECONDS",
        ),
        *CLIENT_SECURITY_OPTIONS,
        Option("--log-level", str, "WARNING", "logging level (DEBUG, INFO, WARNING, ERROR)", "LEVEL"),
    ),
)

_SERVICE_DEFAULT = ServiceConfig(edge=_DEFAULT)

SERVE_OPTIONS = OptionSet(
    env_prefix="SPLITWIRE_EDGE",
    table="edge",
    options=(
        *CONNECTION_OPTIONS.options,
        Option(
            "--host", str, _SERVICE_DEFAULT.host, "address of the local HTTP API (keep loopback unless needed)", "HOST"
        ),
        Option("--port", int, _SERVICE_DEFAULT.port, "port of the local HTTP API (0 picks a free one)", "PORT"),
        Option("--metrics-host", str, _SERVICE_DEFAULT.metrics_host, "address of /metrics", "HOST"),
        Option("--metrics-port", int, DEFAULT_EDGE_METRICS_PORT, "Prometheus /metrics port; -1 disables it", "PORT"),
        Option(
            "--connect-backoff-max",
            float,
            _SERVICE_DEFAULT.connect_backoff_max_s,
            "longest wait between attempts to reach the cloud at start, in seconds (doubling from 0.5, jittered)",
            "SECONDS",
        ),
        Option("--max-texts", int, _SERVICE_DEFAULT.max_texts, "most texts per /v1/infer call", "N"),
    ),
)


def _add_connection_args(parser: argparse.ArgumentParser) -> None:
    CONNECTION_OPTIONS.add_to(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object per input")


def config_from_values(values: dict[str, object]) -> EdgeConfig:
    """The agent's configuration from resolved option values."""
    return EdgeConfig(
        server=values["server"],
        model=values["model"],
        split=values["split"],
        codec=values["codec"],
        timeout_s=values["timeout"],
        max_message_bytes=values["max_message_bytes"],
        max_attempts=values["max_attempts"],
        reconnect_backoff_max_s=values["reconnect_backoff_max"],
        security=client_security(values),
    )


def service_config_from_values(values: dict[str, object]) -> ServiceConfig:
    metrics_port = values["metrics_port"]
    return ServiceConfig(
        edge=config_from_values(values),
        host=values["host"],
        port=values["port"],
        metrics_host=values["metrics_host"],
        metrics_port=None if metrics_port is None or metrics_port < 0 else metrics_port,
        connect_backoff_max_s=values["connect_backoff_max"],
        max_texts=values["max_texts"],
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitwire-edge", description="Run the front half of a split model.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run texts through the split and print the answers")
    _add_connection_args(run)
    run.add_argument(
        "--save-payload", type=Path, default=None, metavar="FILE", help="write the exact payload bytes sent to FILE"
    )
    run.add_argument("texts", nargs="+", metavar="TEXT")
    sim = sub.add_parser("similarity", help="cosine similarity of two texts, both embedded through the split")
    _add_connection_args(sim)
    sim.add_argument("text_a", metavar="A")
    sim.add_argument("text_b", metavar="B")
    gen = sub.add_parser(
        "generate",
        help="generate text with a decoder model through the split, streaming tokens as they arrive",
        description="The edge runs blocks [0, split) with its own KV cache and sends the prompt's hidden states, "
        "then one token's per step; the server runs the rest, chooses each token (greedy, or sampled with "
        "--temperature/--top-p/--seed) and sends it back. Stops at the model's end-of-sequence token or after "
        "--max-new-tokens. --timeout bounds the wait for each token.",
    )
    CONNECTION_OPTIONS.add_to(gen)
    gen.add_argument(
        "--json", action="store_true", help="print one JSON object at the end instead of streaming the text"
    )
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="most new tokens (default: 64)")
    gen.add_argument(
        "--temperature", type=float, default=0.0, metavar="T", help="0 is greedy (the default); above 0 samples"
    )
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default: 1)")
    gen.add_argument("--seed", type=int, default=0, metavar="S", help="sampler seed (default: 0)")
    gen.add_argument("prompt", metavar="PROMPT", help="the text to continue (with --chat: the user's message)")
    serve = sub.add_parser(
        "serve",
        help="run as a service: a local HTTP/JSON API for this device's applications, forwarding to the cloud",
        description='Loads the model once and answers POST /v1/infer {"texts": [...]} and POST /v1/generate '
        '{"prompt": ...} on a loopback HTTP port, GET /healthz (200 once connected to the cloud), and '
        "Prometheus metrics on their own port. Connects to the cloud in the background with exponential "
        "backoff; spreads calls over every replica in --server and retries them on another on UNAVAILABLE. "
        "Runs until SIGTERM or SIGINT.",
    )
    SERVE_OPTIONS.add_to(serve)
    return parser


def _serve(values: dict[str, object]) -> int:
    service = EdgeService(service_config_from_values(values))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    service.start()
    metrics_at = f", metrics on port {service.metrics_port}" if service.metrics_port is not None else ""
    print(
        f"splitwire-edge serving on http://{service.config.host}:{service.port}{metrics_at}, "
        f"cloud {service.config.edge.server}",
        flush=True,
    )
    stop.wait()
    service.stop()
    return 0


def _payload_path(base: Path, index: int, count: int) -> Path:
    return base if count == 1 else base.with_name(f"{base.stem}.{index}{base.suffix}")


def _summary(result: EdgeResult) -> str:
    t = result.timings_ms
    if result.embedding is not None:
        head = ", ".join(f"{v:+.4f}" for v in result.embedding[:4])
        answer = f"embedding[{len(result.embedding)}] = [{head}, ...]"
    else:
        answer = f"next token {result.next_token!r} (id {result.next_token_id})"
    return (
        f"{result.text}\n  {answer}\n  {result.payload_bytes} B payload, {result.tokens} tokens, "
        f"{result.bits_per_token:.1f} bits/token ({result.codec}, split {result.split}); "
        f"front {t['front']:.1f} ms, encode {t['encode']:.2f} ms, round trip {t['round_trip']:.1f} ms"
    )


def _run(agent: EdgeAgent, args: argparse.Namespace) -> None:
    for index, text in enumerate(args.texts):
        result = agent.infer(text)
        if args.save_payload is not None:
            _payload_path(args.save_payload, index, len(args.texts)).write_bytes(result.payload)
        print(json.dumps(result.to_json()) if args.json else _summary(result), flush=True)


def _similarity(agent: EdgeAgent, args: argparse.Namespace) -> None:
    a, b = agent.infer(args.text_a), agent.infer(args.text_b)
    if a.embedding is None or b.embedding is None:
        raise EdgeError("similarity needs an encoder model; this model answers with tokens")
    cosine = float(np.dot(a.embedding, b.embedding))
    if args.json:
        print(json.dumps({"similarity": round(cosine, 6), "a": a.to_json(), "b": b.to_json()}))
    else:
        print(f"{cosine:.4f}")
        sent, tokens = a.payload_bytes + b.payload_bytes, a.tokens + b.tokens
        print(f"  {sent} B sent for {tokens} tokens ({a.codec}, split {a.split})")


def _generate(agent: EdgeAgent, args: argparse.Namespace) -> None:
    if args.seed < 0:
        raise ValueError(f"--seed must be 0 or more, got {args.seed}")
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop_tokens=agent.stop_tokens(),
    )

    def show(token: int, text: str) -> None:
        print(text, end="", flush=True)

    result = agent.generate(args.prompt, params, chat=args.chat, on_token=None if args.json else show)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(flush=True)
        print(_generation_summary(result), file=sys.stderr)


def _generation_summary(result: GenerationResult) -> str:
    t = result.timings_ms
    per_token = f", {t['inter_token_median']:.1f} ms/token (median)" if "inter_token_median" in t else ""
    return (
        f"[{len(result.token_ids)} tokens, {result.finish_reason}; {result.payload_bytes} B sent for "
        f"{result.tokens_sent} tokens, {result.bits_per_token:.1f} bits/token ({result.codec}, split "
        f"{result.split}); time to first token {t['ttft']:.1f} ms{per_token}]"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        values = (SERVE_OPTIONS if args.command == "serve" else CONNECTION_OPTIONS).resolve(args)
        config = config_from_values(values)
        logging.basicConfig(level=str(values["log_level"]).upper(), format="%(levelname)s %(name)s: %(message)s")
    except ValueError as exc:
        print(f"splitwire-edge: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "serve":
            return _serve(values)
        with EdgeAgent(config) as agent:
            agent.connect()
            if args.command == "run":
                _run(agent, args)
            elif args.command == "generate":
                _generate(agent, args)
            else:
                _similarity(agent, args)
    except (EdgeError, ValueError, LookupError, OSError) as exc:
        print(f"splitwire-edge: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
