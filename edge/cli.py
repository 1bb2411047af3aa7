"""``splitwire-edge``: run texts through the split from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from splitwire.edge.agent import EdgeAgent, EdgeConfig, EdgeError, EdgeResult
from splitwire.split.models import DEFAULT_MODEL, MODELS
from splitwire.split.transport import DEFAULT_PORT, DEFAULT_TIMEOUT_SECONDS


def _add_connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=f"127.0.0.1:{DEFAULT_PORT}", help="splitwire-cloud address, HOST:PORT")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model name ({', '.join(MODELS)}) or a Hugging Face folder"
    )
    parser.add_argument("--split", type=int, default=None, help="split point (default: the server's)")
    parser.add_argument("--codec", default=None, help="codec name (default: the server's default)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS, help="deadline per request, s")
    parser.add_argument("--json", action="store_true", help="print one JSON object per input")
    parser.add_argument("--log-level", default="WARNING", help="logging level")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitwire-edge", description="Run the front half of a split model.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run texts through the split and print the answers",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_connection_args(run)
    run.add_argument("--save-payload", type=Path, default=None, help="write the exact payload bytes sent to FILE")
    run.add_argument("texts", nargs="+", metavar="TEXT")
    sim = sub.add_parser(
        "similarity",
        help="cosine similarity of two texts, both embedded through the split",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    config = EdgeConfig(
        server=args.server, model=args.model, split=args.split, codec=args.codec, timeout_s=args.timeout
    )
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
