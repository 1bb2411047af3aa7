"""``splitwire-edge``: run texts through the split from the command line.

Connection options can be given as flags, as environment variables ``SPLITWIRE_EDGE_<OPTION>`` or in
a TOML file (``--config``, keys at the top level or under ``[edge]``), in that order of precedence.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from splitwire.edge.agent import EdgeAgent, EdgeConfig, EdgeError, EdgeResult
from splitwire.split.models import MODELS
from splitwire.split.security import CLIENT_SECURITY_OPTIONS, client_security
from splitwire.split.settings import Option, OptionSet

_DEFAULT = EdgeConfig()

CONNECTION_OPTIONS = OptionSet(
    env_prefix="SPLITWIRE_EDGE",
    table="edge",
    options=(
        Option("--server", str, _DEFAULT.server, "splitwire-cloud address", "HOST:PORT"),
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
        *CLIENT_SECURITY_OPTIONS,
        Option("--log-level", str, "WARNING", "logging level (DEBUG, INFO, WARNING, ERROR)", "LEVEL"),
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
        security=client_security(values),
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
    return parser


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        values = CONNECTION_OPTIONS.resolve(args)
        config = config_from_values(values)
        logging.basicConfig(level=str(values["log_level"]).upper(), format="%(levelname)s %(name)s: %(message)s")
    except ValueError as exc:
        print(f"splitwire-edge: {exc}", file=sys.stderr)
        return 2
    try:
        with EdgeAgent(config) as agent:
            agent.connect()
            if args.command == "run":
                _run(agent, args)
            else:
                _similarity(agent, args)
    except (EdgeError, ValueError, LookupError, OSError) as exc:
        print(f"splitwire-edge: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
