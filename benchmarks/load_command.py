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
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import TracebackType

import numpy as np
import torch
from splitwire.benchmarks import compute_command, workload
from splitwire.benchmarks.load_client import WorkerPlan, WorkerStats, run_worker
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
        assert self.process is not None
        return sum(_cpu_seconds(pid) for pid in _process_tree(self.process.pid))

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


def _server_arguments(args: argparse.Namespace) -> list[str]:
    arguments = [
        "--model", args.model,
        "--metrics-port", "-1",
        "--max-batch-size", str(args.batch_size),
        "--max-queue-delay-ms", str(args.max_queue_delay_ms),
        "--max-queue", str(max(256, 2 * args.concurrency)),
        "--log-level", "WARNING",
    ]  # fmt: skip
    return [*arguments, "--threads", str(args.threads or default_torch_threads())]


def _drive(
    address: str,
    requests: list[bytes],
    metadata: tuple[tuple[str, str], ...],
    security: ClientSecurity,
    args: argparse.Namespace,
    server: ServerProcess | None,
) -> tuple[list[WorkerStats], float | None]:
    """Run the worker processes; their stats and the server's CPU cores used in the window (own server)."""
    processes = max(1, min(args.processes, args.concurrency))
    start_at = time.time() + 3.0  # time for the workers to start and connect
    plans = [
        WorkerPlan(
            address=address,
            requests=requests,
            metadata=metadata,
            concurrency=args.concurrency // processes + (1 if i < args.concurrency % processes else 0),
            start_at=start_at,
            warmup_s=args.warmup,
            duration_s=args.seconds,
            timeout_s=args.timeout,
            security=security,
            offset=i * len(requests) // processes,
        )
        for i in range(processes)
    ]
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        pending = pool.map_async(run_worker, plans)
        server_cpu = None
        if server is not None:
            time.sleep(max(0.0, start_at + args.warmup - time.time()))
            before = server.cpu_seconds()
            time.sleep(args.seconds)
            server_cpu = (server.cpu_seconds() - before) / args.seconds
        stats = pending.get(timeout=args.warmup + args.seconds + 3 * args.timeout + 60)
    return stats, server_cpu


def _summarise(stats: list[WorkerStats], concurrency: int, seconds: float) -> dict[str, object]:
    codes: Counter[str] = Counter()
    errors: dict[str, str] = {}
    latencies: list[float] = []
    for worker in stats:
        codes.update(worker.codes)
        errors.update(worker.errors)
        latencies += worker.latencies_s
    ms = np.array(latencies) * 1000.0 if latencies else np.zeros(1)
    ok = codes.get("OK", 0)
    return {
        "concurrency": concurrency,
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
        "client_cpu_cores": round(sum(w.cpu_s for w in stats) / seconds, 3),
    }


def run(args: argparse.Namespace, security: ClientSecurity) -> dict[str, object]:
    with contextlib.ExitStack() as stack:
        server = None if args.server else stack.enter_context(ServerProcess(_server_arguments(args)))
        address = args.server or server.address  # type: ignore[union-attr]
        engine = compute_command.load_engine(args.model, args.threads)
        assert engine.model is not None and engine.catalog is not None
        config = EdgeConfig(server=address, model=args.model, split=args.split, codec=args.codec, security=security)
        with EdgeAgent(config, engine.model) as agent:
            agent.connect()
        assert agent.cut is not None and agent.codec is not None
        cut, codec = agent.cut, agent.codec
        texts = workload.sentences(args.data, args.sentences)
        payloads = workload.encode(engine.model, cut, codec, texts)
        name, split = engine.model.name, cut.to_wire()
        requests = [
            pb.InferRequest(model=name, split=split, codec=codec.name, payload=p).SerializeToString() for p in payloads
        ]
        metadata = ((MODEL_FINGERPRINT_KEY, engine.model.fingerprint), (CODEC_FINGERPRINT_KEY, codec.fingerprint()))
        jobs = compute_command.decode_jobs(codec, payloads)

        before = compute_command.measure(engine, cut, jobs, args.batch_size, args.compute_seconds)
        log.info("compute before the load: %.1f sequences/s", before.sequences_per_s)
        stats, server_cpu = _drive(address, requests, metadata, security, args, server)
        after = compute_command.measure(engine, cut, jobs, args.batch_size, args.compute_seconds)
        log.info("compute after the load: %.1f sequences/s", after.sequences_per_s)

    load = _summarise(stats, args.concurrency, args.seconds)
    compute_rps = (before.sequences_per_s + after.sequences_per_s) / 2
    efficiency = float(load["rps"]) / compute_rps
    latency = load["latency_ms"]
    assert isinstance(latency, dict)
    print(
        f"{engine.model.name} split {cut.split} codec {codec.name}, concurrency {args.concurrency}: "
        f"server {load['rps']:.1f} req/s (p50 {latency['p50']:.1f} ms, p99 {latency['p99']:.1f} ms), "
        f"compute {compute_rps:.1f} seq/s at batch {args.batch_size} -> efficiency {efficiency:.3f}; "
        f"status {load['status_code_distribution']}; client CPU {load['client_cpu_cores']:.2f} cores"
        + (f", server CPU {server_cpu:.2f} cores" if server_cpu is not None else "")
    )
    return {
        "model": engine.model.name,
        "split": cut.split,
        "codec": codec.name,
        "server": args.server or f"{address} (started by this run)",
        "server_command": None if server is None else " ".join(["splitwire-cloud", *server.command[1:]]),
        "server_cpu_cores": None if server_cpu is None else round(server_cpu, 3),
        "torch_threads": torch.get_num_threads(),
        "client_processes": max(1, min(args.processes, args.concurrency)),
        "sentences": len(texts),
        "load": load,
        "compute": {
            "rps": round(compute_rps, 2),
            "before": before.to_json(),
            "after": after.to_json(),
        },
        "efficiency": round(efficiency, 4),
    }
