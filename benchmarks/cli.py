"""``splitwire-bench``: rate-distortion, codec training and the demo (load and compute come with serving)."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from splitwire.benchmarks import datasets

log = logging.getLogger("splitwire.bench")


def _rows(text: str) -> slice:
    """argparse type for ``START:STOP`` row ranges, its refusal in argparse's words."""
    try:
        return datasets.row_slice(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _write_json(path: Path, payload: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def _run_info(argv: list[str] | None) -> dict[str, object]:
    return {
        "command": "splitwire-bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
    }


# -- rd ------------------------------------------------------------------------------------------


def cmd_rd(args: argparse.Namespace, argv: list[str] | None) -> int:
    from splitwire.benchmarks import rd_command

    payload = rd_command.run(args)
    payload = {**_run_info(argv), **payload}
    _write_json(args.json, payload)
    return 0


# -- train-codec ---------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace, argv: list[str] | None) -> int:
    from splitwire.benchmarks import train_command

    train_command.run(args, _run_info(argv))
    return 0


# -- set-default ---------------------------------------------------------------------------------


def cmd_set_default(args: argparse.Namespace, argv: list[str] | None) -> int:
    from splitwire.benchmarks.shipping import set_default

    set_default(args.name)
    print(f"{args.name} is now its model's default codec")
    return 0


# -- demo ----------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace, argv: list[str] | None) -> int:
    from splitwire.benchmarks import demo

    return demo.run(args)


def cmd_report(args: argparse.Namespace, argv: list[str] | None) -> int:
    from splitwire.benchmarks import report

    return report.run(args)


# -- compute and load (serving) ---------------------------------------------------------------


def _run_local(args: argparse.Namespace, argv: list[str] | None, run) -> int:
    """A benchmark that needs no connection options: its results beside the run info, to --json if given."""
    payload = {**_run_info(argv), **run(args)}
    if args.json:
        _write_json(args.json, payload)
    return 0


def cmd_compute(args: argparse.Namespace, argv: list[str] | None) -> int:
    from splitwire.benchmarks import compute_command

    return _run_local(args, argv, compute_command.run)


def _run_client(args: argparse.Namespace, argv: list[str] | None, run) -> int:
    """A benchmark that talks to a server: its connection options resolved, its results beside the run info."""
    from splitwire.split.security import client_security

    security = client_security(args.connection.resolve(args))
    payload = {**_run_info(argv), **run(args, security)}
    if args.json:
        _write_json(args.json, payload)
    return 0


def cmd_load(args: argparse.Namespace, argv: list[str] | None) -> int:
    from splitwire.benchmarks import load_command

    return _run_client(args, argv, load_command.run)


def cmd_decode_step(args: argparse.Namespace, argv: list[str] | None) -> int:
    from splitwire.benchmarks import decode_step_command

    return _run_client(args, argv, decode_step_command.run)


def cmd_compare(args: argparse.Namespace, argv: list[str] | None) -> int:
    from splitwire.benchmarks import compare_command

    return _run_local(args, argv, compare_command.run)


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    """What the benchmarks with an emulated device (benchmarks/device.py) share."""
    parser.add_argument("--device-cpu", type=float, default=0.25, help="the device's CPU cap, in cores")
    parser.add_argument("--data", type=Path, default=None, help="STS-B csv (default: the bundled dev split)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the results here")


def add_compare_command(sub: argparse._SubParsersAction) -> None:
    from splitwire.split.models import DEFAULT_MODEL

    compare = sub.add_parser(
        "compare",
        help="end-to-end latency, quality, bytes and cloud compute: split codecs vs device only vs cloud only",
        description="Each sentence of --pairs STS-B dev pairs, one request at a time, from an emulated device "
        "(one thread under a CPU quota) through an emulated link (network namespace with rate, delay and "
        "loss per packet, see benchmarks/link.py) to a server this run starts: split + each codec, cloud only "
        "(token ids), and the whole model on the device.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    compare.add_argument("--model", default=DEFAULT_MODEL)
    compare.add_argument("--split", type=int, default=None, help="split point (default: the model's)")
    compare.add_argument(
        "--codecs", default=None, help="codecs at the split, comma-separated (default: fp16, int8-zstd, the default)"
    )
    compare.add_argument(
        "--links",
        default="1mbit/100ms,10mbit/40ms,100mbit/10ms",
        help="link profiles BANDWIDTH/RTT[/LOSS], comma-separated",
    )
    compare.add_argument("--pairs", type=int, default=50, help="STS-B dev pairs; each sentence is one request")
    compare.add_argument("--warmup", type=int, default=5, help="requests before measuring, per configuration")
    compare.add_argument(
        "--simulate-link", action="store_true", help="never use namespaces: add bytes / bandwidth + round trip"
    )
    compare.add_argument("--plot", type=Path, default=None, metavar="PNG", help="draw the latency bars here")
    _add_device_options(compare)
    compare.set_defaults(handler=cmd_compare)


def cmd_advise(args: argparse.Namespace, argv: list[str] | None) -> int:
    from splitwire.benchmarks import advise_command

    return _run_local(args, argv, advise_command.run)


def add_advise_command(sub: argparse._SubParsersAction) -> None:
    from splitwire.split.models import DEFAULT_MODEL

    advise = sub.add_parser(
        "advise",
        help="recommend the split point and codec for a link, within a quality budget",
        description="Predicts end-to-end latency and cloud compute of every split point and codec in an rd "
        "JSON, and of cloud only and device only, from per-block and per-codec times measured on an emulated "
        "device and in this process, for one link; recommends the fastest (or least cloud) within the budget.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    advise.add_argument("--model", default=DEFAULT_MODEL)
    advise.add_argument("--link", default="1mbit/100ms", help="BANDWIDTH/RTT, e.g. 10mbit/40ms")
    advise.add_argument("--rd", type=Path, default=Path("results/rd_stsb.json"), help="an rd JSON for the model")
    advise.add_argument(
        "--quality-budget", type=float, default=0.01, help="largest relative quality loss accepted (0.01: 1%%)"
    )
    advise.add_argument(
        "--minimise",
        choices=["latency", "cloud"],
        default="latency",
        help="latency: end to end; cloud: the least cloud compute of a split, the fastest among those within "
        "--cloud-tolerance of it",
    )
    advise.add_argument(
        "--cloud-tolerance", type=float, default=0.1, help="cloud times this close to the least count as equal"
    )
    advise.add_argument("--sentences", type=int, default=20, help="STS-B dev sentences timed")
    _add_device_options(advise)
    advise.set_defaults(handler=cmd_advise)


def add_serving_commands(sub: argparse._SubParsersAction) -> None:
    """``compute`` (the back half's pure batched throughput) and ``load`` (a server under closed-loop load)."""
    from splitwire.split.models import DEFAULT_MODEL
    from splitwire.split.security import CLIENT_SECURITY_OPTIONS
    from splitwire.split.settings import OptionSet

    threads = "torch threads: the global --threads, by default every core but one, as splitwire-cloud serve uses"
    compute = sub.add_parser(
        "compute",
        help="pure batched throughput of the back half (no gRPC; no decoding unless --with-decoding)",
        description=f"The server's compute function alone on STS-B dev batches. {threads}.",
    )
    load = sub.add_parser(
        "load",
        help="load on a server (closed-loop concurrency or open-loop rate, one level or a sweep), its "
        "throughput against compute measured in the same run (efficiency)",
        description=f"Throughput, latency and status codes under load, measured in windows until stable, beside "
        f"the pure compute throughput measured in the same run; efficiency = their ratio. {threads}.",
    )
    for parser in (compute, load):
        parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or folder (default: {DEFAULT_MODEL})")
        parser.add_argument("--split", type=int, default=None, help="split point (default: the model's)")
        parser.add_argument("--codec", default=None, help="codec (default: the server's default for the split)")
        parser.add_argument(
            "--batch-size", type=int, default=32, help="sequences per compute batch; the server's --max-batch-size (32)"
        )
        parser.add_argument("--data", type=Path, default=None, help="STS-B csv (default: the bundled dev split)")
        parser.add_argument("--sentences", type=int, default=1000, help="unique sentences to send or compute (1000)")
        parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the results here")
    compute.add_argument("--seconds", type=float, default=10.0, help="seconds of compute after warm-up (10)")
    compute.add_argument(
        "--with-decoding",
        action="store_true",
        help="time what the compute process does per batch: decode the payloads (together), then the back half",
    )
    compute.set_defaults(handler=cmd_compute)

    load.add_argument(
        "--server", default=None, metavar="HOST:PORT", help="a running server (default: start one on loopback)"
    )
    load.add_argument(
        "--concurrency", default="32", help="outstanding requests, closed loop; a comma-separated list sweeps (32)"
    )
    load.add_argument(
        "--rate",
        default=None,
        help="open loop instead: Poisson arrivals per second, comma-separated levels; latency counts from each "
        "request's scheduled time",
    )
    load.add_argument("--processes", type=int, default=1, help="client processes sharing the load (1)")
    load.add_argument("--max-queue-delay-ms", type=float, default=2.0, help="the started server's (2.0)")
    load.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring (3)")
    load.add_argument("--window-seconds", type=float, default=5.0, help="length of a measurement window (5)")
    load.add_argument(
        "--stable-windows", type=int, default=3, help="consecutive windows that must agree; they are reported (3)"
    )
    load.add_argument(
        "--stability",
        type=float,
        default=0.1,
        help="largest relative spread of throughput and p50 latency across those windows (0.1)",
    )
    load.add_argument(
        "--max-windows", type=int, default=8, help="stop after this many windows, stable or not; all are reported (8)"
    )
    load.add_argument("--csv", type=Path, default=None, help="perf_analyzer-style CSV (default: next to --json)")
    load.add_argument(
        "--plot", type=Path, default=None, help="PNG of latency against throughput (default: next to --json)"
    )
    load.add_argument("--compute-seconds", type=float, default=5.0, help="seconds of compute before and after (5)")
    load.add_argument("--timeout", type=float, default=30.0, help="deadline per request, seconds (30)")
    connection = OptionSet("SPLITWIRE_BENCH", "bench", CLIENT_SECURITY_OPTIONS)
    connection.add_to(load)
    load.set_defaults(handler=cmd_load, connection=connection)

    step = sub.add_parser(
        "decode-step",
        help="one generation step through the split (loopback) against one unsplit step, same run",
        description=f"Median time between two generated tokens arriving at the edge, greedy, against the median "
        f"unsplit decode step timed before and after in this process; ratio = split / unsplit. {threads}.",
    )
    step.add_argument("--model", default="smollm2", help="a decoder model (default: smollm2)")
    step.add_argument("--split", type=int, default=None, help="split point (default: the model's)")
    step.add_argument("--codec", default=None, help="codecs, comma-separated (default: the server's default)")
    step.add_argument("--steps", type=int, default=100, help="decode steps timed per codec and for unsplit (100)")
    step.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds, each timing every variant's --steps steps (3)"
    )
    step.add_argument("--prompt", default=None, help="text generation continues (default: an encyclopedic opening)")
    step.add_argument(
        "--server", default=None, metavar="HOST:PORT", help="a running server (default: start one on loopback)"
    )
    step.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the results here")
    step_connection = OptionSet("SPLITWIRE_BENCH", "bench", CLIENT_SECURITY_OPTIONS)
    step_connection.add_to(step)
    step.set_defaults(handler=cmd_decode_step, connection=step_connection)


def build_parser() -> argparse.ArgumentParser:
    from splitwire.split.models import DEFAULT_MODEL
    from splitwire.split.transport import DEFAULT_PORT

    parser = argparse.ArgumentParser(prog="splitwire-bench", description="Benchmarks for split inference.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    rd = sub.add_parser("rd", help="rate against task quality for codecs and split points", formatter_class=fmt)
    rd.add_argument("--model", default=DEFAULT_MODEL)
    rd.add_argument("--task", choices=["stsb", "classify", "lm"], default="stsb")
    rd.add_argument("--data", type=Path, default=None, help="evaluation file in its original format")
    rd.add_argument("--train", type=Path, default=None, help="classify: file the logistic-regression head learns from")
    rd.add_argument("--train-limit", type=int, default=None, help="classify: use only the first N training rows")
    rd.add_argument(
        "--slice", type=_rows, default=None, help="evaluate rows START:STOP of the data file (Python slice)"
    )
    rd.add_argument(
        "--split", default=None, help="split point(s), comma-separated, or 'all' (default: the model's default)"
    )
    rd.add_argument("--codec", default=None, help="codec names, comma-separated (default: every codec)")
    rd.add_argument("--json", type=Path, required=True, help="where to write the results")
    rd.add_argument("--plot", type=Path, default=None, help="PNG of the curves (default: next to --json)")
    rd.add_argument("--max-tokens", type=int, default=None, help="lm: evaluate at most N tokens (default: all)")
    rd.add_argument("--window", type=int, default=512, help="lm: tokens per window (one payload each)")
    rd.add_argument(
        "--record-manifest", action="store_true", help="store the figures of shipped codecs in their manifest"
    )
    rd.set_defaults(handler=cmd_rd)

    train = sub.add_parser("train-codec", help="train (or fit) a codec at a split point", formatter_class=fmt)
    train.add_argument("--model", default=DEFAULT_MODEL)
    train.add_argument("--kind", choices=["factorized", "hyperprior", "uniform", "pca"], required=True)
    train.add_argument("--split", type=int, required=True)
    train.add_argument("--lambda", dest="lmbda", type=float, default=1000.0, help="distortion weight")
    train.add_argument("--steps", type=int, default=3000)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up")
    train.add_argument(
        "--transform-lr-scale",
        type=float,
        default=1.0,
        help="learning rate of the transforms relative to the entropy models (wide transforms want < 1)",
    )
    train.add_argument(
        "--embedding-distortion",
        choices=["cosine", "covariance"],
        default="cosine",
        help="encoders: 1 - cosine to the unsplit embedding, or the error weighted by the embeddings' covariance "
        "(errors along directions sentences differ along cost more)",
    )
    train.add_argument(
        "--head-emphasis",
        type=float,
        default=1.0,
        metavar="K",
        help="covariance distortion: weigh errors in the directions a logistic-regression head on the unsplit "
        "embeddings reads K times as much (1: off; learned kinds only); the head learns from --head-data",
    )
    train.add_argument(
        "--head-data",
        type=Path,
        default=None,
        help="text<TAB>label file the --head-emphasis head learns from; default: the first 20,000 SST-2 train "
        "rows (the ones the default training texts include)",
    )
    train.add_argument("--batch-tokens", type=int, default=1024)
    train.add_argument("--latent-channels", type=int, default=64, help="factorized (0: no transform), hyperprior")
    train.add_argument("--side-channels", type=int, default=8, help="hyperprior")
    train.add_argument("--hidden", type=int, default=256, help="width of the transforms' hidden layers")
    train.add_argument("--layers", type=int, default=2, help="hidden layers of each transform")
    train.add_argument("--scale-count", type=int, default=64, help="hyperprior: Gaussian scales in the table")
    train.add_argument("--scale-max", type=float, default=64.0, help="hyperprior: largest scale in the table")
    train.add_argument("--token-gate", action="store_true", help="learn to drop tokens on the edge")
    train.add_argument(
        "--context-channels", type=int, default=0, help="hyperprior: per-sequence context sent once per payload"
    )
    train.add_argument(
        "--context-hidden",
        type=int,
        default=None,
        help="hyperprior: width of the context transform's hidden layers (default: --hidden); 0 makes the "
        "context a linear map of the mean token, which saves the encoder a product over every token",
    )
    train.add_argument(
        "--temporal-prediction",
        action="store_true",
        help="hyperprior: predict each token's latents from the token before it (in the same payload, or in "
        "a generation the stream's previous payload, which edge and server carry over)",
    )
    train.add_argument(
        "--front-adapter-rank",
        type=int,
        default=0,
        metavar="R",
        help="decoders: train with the codec a rank-R correction of every linear layer of the front blocks (a "
        "front adapter, shipped in the codec's checkpoint and run by the edge), so the front learns to emit "
        "hidden states that cost fewer bits; the cloud's back half stays the model's own (default 0: none)",
    )
    train.add_argument(
        "--raw-token-threshold",
        type=float,
        default=0.0,
        help="hyperprior: send tokens with a value beyond this magnitude as float16 (0: never); decoder LMs "
        "need it for their attention-sink tokens",
    )
    train.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="encoders: truncate training sentences here (default 64); decoders: window length (default 128)",
    )
    train.add_argument(
        "--latent-scale",
        type=float,
        default=1.0,
        help="factorized, hyperprior: start rounding at 1/SCALE standard deviations (larger: finer, more bits)",
    )
    train.add_argument(
        "--shared-step",
        action="store_true",
        help="hyperprior: start from the hidden states' own principal components, all rounded with one step "
        "(1/SCALE of their root-mean-square deviation), so weak components get few bits; default: whitened "
        "components, each rounded at 1/SCALE of its own deviation",
    )
    train.add_argument("--step", type=float, default=0.5, help="uniform, pca: quantisation step in standard deviations")
    train.add_argument("--components", type=int, default=64, help="pca")
    train.add_argument(
        "--train-data",
        type=Path,
        nargs="*",
        default=None,
        help="training files (STS-B csv, text<TAB>label tsv, or for decoders a WikiText .tokens file, read as one "
        "running text); default: STS-B train minus its last 500 pairs, plus the first 20,000 SST-2 train sentences",
    )
    train.add_argument(
        "--train-slice",
        type=_rows,
        default=None,
        help="use only rows START:STOP of each --train-data file (pairs, rows, or a WikiText file's non-empty lines, "
        "as rd's --slice counts them): keeps apart the part of a file that is evaluated",
    )
    train.add_argument(
        "--init-from",
        default=None,
        metavar="CODEC",
        help="start from this shipped codec of the model (or a codec .safetensors file) instead of a fresh one "
        "fitted to the data: more training for it; the options must be the ones it was trained with",
    )
    train.add_argument("--out", type=Path, default=None, help="run folder (default: runs/NAME)")
    train.add_argument("--name", default=None, help="codec name (default: KIND-sSPLIT-...)")
    train.add_argument("--install", action="store_true", help="ship the result: copy it into the codec package")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(handler=cmd_train)

    default = sub.add_parser(
        "set-default",
        help="make a shipped codec its model's default (servers use it when a request names none)",
        formatter_class=fmt,
    )
    default.add_argument("name", help="a codec in codec/checkpoints/manifest.json")
    default.set_defaults(handler=cmd_set_default)

    demo = sub.add_parser(
        "demo", help="score STS-B sentence pairs through a running server, per codec", formatter_class=fmt
    )
    demo.add_argument("--server", default=f"127.0.0.1:{DEFAULT_PORT}")
    demo.add_argument("--model", default=DEFAULT_MODEL)
    demo.add_argument("--codecs", default=None, help="comma-separated (default: raw codecs + shipped ones)")
    demo.add_argument("--pairs", type=int, default=200, help="STS-B dev pairs to score")
    demo.add_argument("--show", type=int, default=5, help="pairs to print one by one")
    demo.add_argument("--data", type=Path, default=None, help="STS-B csv (default: the bundled dev split)")
    demo.add_argument("--json", type=Path, default=None, help="also write the results here")
    demo.set_defaults(handler=cmd_demo)

    report = sub.add_parser("report", help="print rd JSON results as Markdown tables", formatter_class=fmt)
    report.add_argument("files", type=Path, nargs="+", metavar="JSON")
    report.add_argument("--plot", action="store_true", help="also draw each file's PNG again from its rows")
    report.set_defaults(handler=cmd_report)

    add_serving_commands(sub)
    add_compare_command(sub)
    add_advise_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        code = args.handler(args, argv)
    except (FileNotFoundError, ValueError, LookupError, NotImplementedError) as exc:
        print(f"splitwire-bench: {exc}", file=sys.stderr)
        return 2
    log.info("done in %.1f s", time.perf_counter() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
