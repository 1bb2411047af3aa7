"""``splitwire-bench load``: closed-loop load on a server, beside the pure compute measured in the same run.

::

    STS-B dev -> payloads (front half + codec, once, off the clock)
    compute   -> the back half alone on batches of --batch-size            (sequences/s, before the load)
    load      -> --processes x (--concurrency / processes) outstanding Infer calls for --warmup + --seconds
    compute   -> again, after the load; the mean of both is the ceiling
    efficiency = server throughput / compute throughput

Without ``--server`` it starts ``splitwire-cloud serve`` on a free loopback port with the same model and
torch threads, and stops it afterwards. Result names follow ghz and perf_analyzer where they mean the
same: ``rps`` (perf_analyzer "Inferences/Second"), ``latency_ms`` ``p50``/``p90``/``p99`` ("p99 latency"),
``status_code_distribution`` (ghz ``statusCodeDistribution``), ``count``, ``concurrency``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import torch
from splitwire.benchmarks import compute_command, workload
from splitwire.benchmarks.load_client import HEALTH_CHECK_METHOD, INFER_METHOD, WindowStats, WorkerPlan, run_worker
from splitwire.cloud.config import default_torch_threads
from splitwire.edge.agent import EdgeAgent, EdgeConfig
from splitwire.split.security import ClientSecurity
from splitwire.split.transport import CODEC_FINGERPRINT_KEY, MODEL_FINGERPRINT_KEY
from splitwire.v1 import splitwire_pb2 as pb

log = logging.getLogger(__name__)


class ServerProcess:
    """``splitwire-cloud serve`` on a free port (loopback unless ``--host`` says otherwise), as a child
    process; SIGTERM on exit. ``launcher`` prefixes the command (e.g. ``ip netns exec NAME``)."""

    def __init__(self, arguments: list[str], launcher: list[str] | None = None) -> None:
        serve = [str(Path(sys.executable).parent / "splitwire-cloud"), "serve", "--port", "0", *arguments]
        self.command = [*(launcher or []), *serve]
        self.process: subprocess.Popen[str] | None = None
        self.address = ""

    def __enter__(self) -> ServerProcess:
        log.info("starting %s", " ".join(self.command))
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.process.stdout is not None and self.process.stderr is not None
        line = self.process.stdout.readline()
        match = re.search(r"serving on ([\w.\-:]+:\d+),", line)
        if match is None:
            self.process.kill()
            raise RuntimeError(f"splitwire-cloud did not start: {line}{self.process.stderr.read()[-2000:]}")
        self.address = match.group(1)
        return self

    def cpu_seconds(self) -> float:
        """User + system CPU the server and its compute process have used so far."""
        return self.cpu_seconds_split()[0]

    def cpu_seconds_split(self) -> tuple[float, float]:
        """:meth:`cpu_seconds`, and the part of it the compute process (the server's descendants) used,
        read in one walk of the process tree."""
        assert self.process is not None
        server, *descendants = (_cpu_seconds(pid) for pid in _process_tree(self.process.pid))
        compute = sum(descendants)
        return server + compute, compute

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc)."""
    pids, index = [pid], 0
    while index < len(pids):
        for task in Path(f"/proc/{pids[index]}/task").glob("*/children"):
            with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
                pids += [int(child) for child in task.read_text().split()]
        index += 1
    return pids


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:  # exited meanwhile
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_arguments(args: argparse.Namespace, levels: list[Level]) -> list[str]:
    most = max(max(level.concurrency for level in levels), 1)
    arguments = [
        "--model", args.model,
        "--metrics-port", "-1",
        "--max-batch-size", str(args.batch_size),
        "--max-queue-delay-ms", str(args.max_queue_delay_ms),
        "--max-queue", str(max(256, 2 * most)),
        "--log-level", "WARNING",
    ]  # fmt: skip
    return [*arguments, "--threads", str(args.threads or default_torch_threads())]


@dataclass(frozen=True)
class Level:
    """One load level: a closed loop of ``concurrency`` calls, or open-loop arrivals at ``rate`` a second."""

    concurrency: int = 0
    rate: float = 0.0

    @property
    def label(self) -> str:
        return f"concurrency {self.concurrency}" if self.concurrency else f"rate {self.rate:g}/s"


def levels_from(args: argparse.Namespace) -> list[Level]:
    """``--rate R[,R...]`` (open loop) or else ``--concurrency C[,C...]`` (closed loop)."""
    try:
        if args.rate:
            levels = [Level(rate=float(r)) for r in args.rate.split(",")]
        else:
            levels = [Level(concurrency=int(c)) for c in str(args.concurrency).split(",")]
    except ValueError:
        levels_given = f"--concurrency {args.concurrency!r}, --rate {args.rate!r}"
        raise ValueError(f"load levels must be numbers: {levels_given}") from None
    if not levels or any(level.concurrency < 1 and level.rate <= 0 for level in levels):
        raise ValueError("every --concurrency must be at least 1 and every --rate positive")
    return levels


@dataclass
class Measurement:
    """What the workers reported for one level: the windows kept, whether they were stable, server CPU."""

    windows: list[list[WindowStats]]  # kept windows, each with one entry per worker
    window_rps: list[float]  # every window measured, in order
    stable: bool
    server_cpu_cores: float | None
    compute_cpu_cores: float | None  # the compute process alone; part of server_cpu_cores
    processes: int


def _drive(
    address: str,
    requests: list[bytes],
    metadata: tuple[tuple[str, str], ...],
    security: ClientSecurity,
    level: Level,
    args: argparse.Namespace,
    server: ServerProcess | None,
    method: str = INFER_METHOD,
) -> Measurement:
    """Run the worker processes window by window until ``--stable-windows`` windows agree within
    ``--stability`` on throughput and median latency (perf_analyzer's rule), or ``--max-windows``."""
    processes = max(1, min(args.processes, level.concurrency or args.processes))
    start_at = time.time() + 3.0  # time for the workers to start and connect
    plans = [
        WorkerPlan(
            address=address,
            requests=requests,
            metadata=metadata,
            start_at=start_at,
            warmup_s=args.warmup,
            window_s=args.window_seconds,
            max_windows=args.max_windows,
            timeout_s=args.timeout,
            concurrency=level.concurrency // processes + (1 if i < level.concurrency % processes else 0),
            rate=level.rate / processes,
            method=method,
            security=security,
            offset=i * len(requests) // processes,
            seed=i,
        )
        for i in range(processes)
    ]
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(processes) as pool:
        reports, stop = manager.Queue(), manager.Event()
        pending = pool.starmap_async(run_worker, [(plan, i, reports, stop) for i, plan in enumerate(plans)])
        windows: list[list[WindowStats]] = []
        rps: list[float] = []
        p50: list[float] = []
        cpu_marks: list[tuple[float, float]] = []
        if server is not None:
            time.sleep(max(0.0, start_at + args.warmup - time.time()))
            cpu_marks.append(server.cpu_seconds_split())
        stable = False
        for _ in range(args.max_windows):
            window = [reports.get(timeout=args.window_seconds + args.timeout + 60) for _ in range(processes)]
            if server is not None:
                cpu_marks.append(server.cpu_seconds_split())
            windows.append(window)
            latencies = [lat for stats in window for lat in stats.latencies_s]
            rps.append(sum(stats.codes.get("OK", 0) for stats in window) / args.window_seconds)
            p50.append(float(np.median(latencies)) if latencies else 0.0)
            stable = _agree(rps[-args.stable_windows :], args) and _agree(p50[-args.stable_windows :], args)
            if len(windows) >= args.stable_windows and stable:
                break
        stop.set()
        pending.get(timeout=3 * args.timeout + 60)
    kept = args.stable_windows if stable else len(windows)
    server_cpu = compute_cpu = None
    if server is not None:
        seconds = kept * args.window_seconds
        server_cpu, compute_cpu = ((b - a) / seconds for a, b in zip(cpu_marks[-1 - kept], cpu_marks[-1], strict=True))
    return Measurement(windows[-kept:], rps, stable, server_cpu, compute_cpu, processes)


def _agree(values: list[float], args: argparse.Namespace) -> bool:
    """Whether the last ``--stable-windows`` values lie within ``--stability`` of their mean."""
    if len(values) < args.stable_windows:
        return False
    mean = float(np.mean(values))
    return all(abs(v - mean) <= args.stability * mean for v in values)


def _summarise(measurement: Measurement, level: Level, window_s: float) -> dict[str, object]:
    codes: Counter[str] = Counter()
    errors: dict[str, str] = {}
    latencies: list[float] = []
    cpu = 0.0
    for window in measurement.windows:
        for stats in window:
            codes.update(stats.codes)
            errors.update(stats.errors)
            latencies += stats.latencies_s
            cpu += stats.cpu_s
    seconds = window_s * len(measurement.windows)
    ms = np.array(latencies) * 1000.0 if latencies else np.zeros(1)
    ok = codes.get("OK", 0)
    return {
        "concurrency": level.concurrency or None,
        "request_rate": level.rate or None,
        "count": sum(codes.values()),
        "duration_s": seconds,
        "rps": round(ok / seconds, 2),
        "latency_ms": {
            "average": round(float(ms.mean()), 3),
            "fastest": round(float(ms.min()), 3),
            "slowest": round(float(ms.max()), 3),
            **{f"p{q}": round(float(np.percentile(ms, q)), 3) for q in (50, 90, 95, 99)},
        },
        "status_code_distribution": dict(codes),
        "error_distribution": errors,
        "stable": measurement.stable,
        "windows_measured": len(measurement.window_rps),
        "window_rps": [round(r, 2) for r in measurement.window_rps],
        "client_processes": measurement.processes,
        "client_cpu_cores": round(cpu / seconds, 3),
        "client_cpu_ms_per_request": round(1000 * cpu / max(sum(codes.values()), 1), 4),
        "server_cpu_cores": _rounded(measurement.server_cpu_cores),
        "compute_cpu_cores": _rounded(measurement.compute_cpu_cores),
    }


def _rounded(cores: float | None) -> float | None:
    return None if cores is None else round(cores, 3)


def _noop_overhead(
    address: str, security: ClientSecurity, args: argparse.Namespace, server: ServerProcess | None
) -> dict[str, object]:
    """The client's own floor: health checks (no decoding, no model) through the same worker, one at a time."""
    quick = argparse.Namespace(**{**vars(args), "warmup": 1.0, "max_windows": 3, "stable_windows": 3})
    measurement = _drive(address, [b""], (), security, Level(concurrency=1), quick, server, HEALTH_CHECK_METHOD)
    summary = _summarise(measurement, Level(concurrency=1), quick.window_seconds)
    return {
        "method": HEALTH_CHECK_METHOD,
        "concurrency": 1,
        "rps": summary["rps"],
        "latency_ms": summary["latency_ms"],
        "client_cpu_ms_per_request": summary["client_cpu_ms_per_request"],
    }


def run(args: argparse.Namespace, security: ClientSecurity) -> dict[str, object]:
    levels = levels_from(args)
    with contextlib.ExitStack() as stack:
        server = None if args.server else stack.enter_context(ServerProcess(_server_arguments(args, levels)))
        address = args.server or server.address  # type: ignore[union-attr]
        engine = compute_command.load_engine(args.model, args.threads)
        assert engine.model is not None and engine.catalog is not None
        config = EdgeConfig(server=address, model=args.model, split=args.split, codec=args.codec, security=security)
        with EdgeAgent(config, engine.model) as agent:
            agent.connect()
        assert agent.cut is not None and agent.codec is not None
        cut, codec = agent.cut, agent.codec
        texts = workload.sentences(args.data, args.sentences)
        encoded = workload.encode(engine.model, cut, codec, texts)
        name, split = engine.model.name, cut.to_wire()
        requests = [
            pb.InferRequest(model=name, split=split, codec=codec.name, payload=p).SerializeToString()
            for p in encoded.payloads
        ]
        metadata = ((MODEL_FINGERPRINT_KEY, engine.model.fingerprint), (CODEC_FINGERPRINT_KEY, codec.fingerprint()))
        jobs = compute_command.decode_jobs(codec, encoded.payloads)

        noop = _noop_overhead(address, security, args, server)
        log.info("no-op health check: p50 %.3f ms", noop["latency_ms"]["p50"])  # type: ignore[index]
        before = compute_command.measure(engine, cut, jobs, args.batch_size, args.compute_seconds)
        log.info("compute before the load: %.1f sequences/s", before.sequences_per_s)
        results = []
        for level in levels:
            measurement = _drive(address, requests, metadata, security, level, args, server)
            results.append(_summarise(measurement, level, args.window_seconds))
        after = compute_command.measure(engine, cut, jobs, args.batch_size, args.compute_seconds)
        log.info("compute after the load: %.1f sequences/s", after.sequences_per_s)

    compute_rps = (before.sequences_per_s + after.sequences_per_s) / 2
    client_stages = {
        "front": round(float(np.mean(encoded.front_ms)), 3),
        "encode": round(float(np.mean(encoded.encode_ms)), 3),
    }
    for level, result in zip(levels, results, strict=True):
        result["efficiency"] = round(float(result["rps"]) / compute_rps, 4)
        latency = result["latency_ms"]
        assert isinstance(latency, dict)
        result["client_stages_ms"] = {**client_stages, "network_and_server": latency["p50"]}
        print(
            f"{engine.model.name} split {cut.split} codec {codec.name}, {level.label}: "
            f"server {result['rps']:.1f} req/s (p50 {latency['p50']:.1f} ms, p99 {latency['p99']:.1f} ms), "
            f"compute {compute_rps:.1f} seq/s at batch {args.batch_size} -> efficiency {result['efficiency']:.3f}; "
            f"status {result['status_code_distribution']}; {'stable' if result['stable'] else 'NOT stable'} after "
            f"{result['windows_measured']} windows; client CPU {result['client_cpu_cores']:.2f} cores"
            + (
                f", server CPU {result['server_cpu_cores']:.2f} cores"
                f" (compute process {result['compute_cpu_cores']:.2f})"
                if result["server_cpu_cores"] is not None
                else ""
            )
        )
    print(
        f"client overhead: a no-op call (health check) takes p50 {noop['latency_ms']['p50']:.3f} ms and "  # type: ignore[index]
        f"{noop['client_cpu_ms_per_request']:.3f} ms of client CPU"
    )
    headline = results[-1]
    outputs = {}
    if args.json:
        csv_path = args.csv or args.json.with_suffix(".csv")
        plot_path = args.plot or args.json.with_suffix(".png")
        _write_csv(results, csv_path)
        _plot(results, plot_path, f"{engine.model.name} split {cut.split}, {codec.name}")
        outputs = {"csv": str(csv_path), "plot": str(plot_path)}
    return {
        "model": engine.model.name,
        "split": cut.split,
        "codec": codec.name,
        "server": args.server or f"{address} (started by this run)",
        "server_command": None if server is None else " ".join(["splitwire-cloud", *server.command[1:]]),
        "server_cpu_cores": headline["server_cpu_cores"],
        "torch_threads": torch.get_num_threads(),
        "client_processes": headline["client_processes"],
        "sentences": len(texts),
        "payload_bytes_mean": round(float(np.mean([len(p) for p in encoded.payloads])), 2),
        "bits_per_token": round(encoded.bits_per_token, 3),
        "client_stages_ms": client_stages,
        "client_overhead": noop,
        "window_s": args.window_seconds,
        "stability": {"windows": args.stable_windows, "within": args.stability, "max_windows": args.max_windows},
        "load": headline,
        "levels": results,
        "compute": {
            "rps": round(compute_rps, 2),
            "before": before.to_json(),
            "after": after.to_json(),
        },
        "efficiency": headline["efficiency"],
        **outputs,
    }


# perf_analyzer's CSV names where the meaning is the same (its latencies are in microseconds).
CSV_COLUMNS = [
    ("Concurrency", lambda r: r["concurrency"] or ""),
    ("Request Rate", lambda r: r["request_rate"] or ""),
    ("Inferences/Second", lambda r: r["rps"]),
    ("Client Front", lambda r: round(1000 * r["client_stages_ms"]["front"])),
    ("Client Encode", lambda r: round(1000 * r["client_stages_ms"]["encode"])),
    ("Avg latency", lambda r: round(1000 * r["latency_ms"]["average"])),
    ("p50 latency", lambda r: round(1000 * r["latency_ms"]["p50"])),
    ("p90 latency", lambda r: round(1000 * r["latency_ms"]["p90"])),
    ("p95 latency", lambda r: round(1000 * r["latency_ms"]["p95"])),
    ("p99 latency", lambda r: round(1000 * r["latency_ms"]["p99"])),
    ("Errors", lambda r: r["count"] - r["status_code_distribution"].get("OK", 0)),
    ("Efficiency", lambda r: r["efficiency"]),
    ("Client CPU Cores", lambda r: r["client_cpu_cores"]),
    ("Server CPU Cores", lambda r: "" if r["server_cpu_cores"] is None else r["server_cpu_cores"]),
    ("Compute CPU Cores", lambda r: "" if r["compute_cpu_cores"] is None else r["compute_cpu_cores"]),
    ("Stable", lambda r: int(r["stable"])),
]


def _write_csv(results: list[dict[str, object]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([name for name, _ in CSV_COLUMNS])
        for result in results:
            writer.writerow([value(result) for _, value in CSV_COLUMNS])
    print(f"wrote {path}")


def _plot(results: list[dict[str, object]], path: Path, title: str) -> None:
    """Latency percentiles against throughput, one point per level, labelled with the level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rps = [r["rps"] for r in results]
    for quantile, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
        ax.plot(rps, [r["latency_ms"][quantile] for r in results], style, label=quantile)  # type: ignore[index]
    for r in results:
        label = f"c={r['concurrency']}" if r["concurrency"] else f"{r['request_rate']:g}/s"
        ax.annotate(label, (r["rps"], r["latency_ms"]["p50"]), textcoords="offset points", xytext=(4, -10), fontsize=8)  # type: ignore[index]
    ax.set_xlabel("throughput, requests/s")
    ax.set_ylabel("latency, ms")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
