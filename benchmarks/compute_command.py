"""``splitwire-bench compute``: the back half's pure batched throughput, the ceiling a server can reach.

The server's own compute function (:class:`~splitwire.cloud.back.BackHalf`: pad to the longest sequence,
mask, blocks [k, L), head) runs on batches of ``--batch-size`` decoded STS-B dev payloads, back to back
in this process with the server's torch threads, after warm-up. No gRPC, no decoding, no queueing, no
compute process: what is left when serving costs nothing.

::

    payloads --decode (off the clock)--> jobs --[batch of B]--> run_back --> sequences / second
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from splitwire.benchmarks import workload
from splitwire.cloud.back import BackJob, kept_positions
from splitwire.cloud.config import ComputeMode, ServerConfig, default_torch_threads
from splitwire.cloud.engine import InferenceEngine
from splitwire.codec.base import Codec
from splitwire.split.cut import Cut

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComputeResult:
    sequences_per_s: float
    batch_size: int
    batches: int
    seconds: float
    batch_latency_ms: dict[str, float]  # p50, p90, p99 of one batch's run_back
    mean_tokens: float  # per sequence, kept tokens

    def to_json(self) -> dict[str, object]:
        return {
            "rps": round(self.sequences_per_s, 2),
            "batch_size": self.batch_size,
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
            "batch_latency_ms": {k: round(v, 3) for k, v in self.batch_latency_ms.items()},
            "mean_tokens": round(self.mean_tokens, 2),
        }


def decode_jobs(codec: Codec, payloads: list[bytes]) -> list[BackJob]:
    """What decoding hands the back half for each payload."""
    jobs = []
    for payload in payloads:
        header, hidden = codec.decode_payload(payload)
        jobs.append(BackJob(hidden, kept_positions(header)))
    return jobs


def measure(
    engine: InferenceEngine, cut: Cut, jobs: list[BackJob], batch_size: int, seconds: float, warmup_batches: int = 3
) -> ComputeResult:
    """Run consecutive batches of ``jobs`` (cycling) for about ``seconds`` after ``warmup_batches``."""
    if not jobs:
        raise ValueError("no jobs to compute")
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs) - batch_size + 1, batch_size)] or [jobs]
    for batch in batches[:warmup_batches]:
        engine.run_back(cut, batch)
    latencies: list[float] = []
    sequences = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or not latencies:
        batch = batches[len(latencies) % len(batches)]
        t0 = time.perf_counter()
        engine.run_back(cut, batch)
        latencies.append(time.perf_counter() - t0)
        sequences += len(batch)
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000.0
    return ComputeResult(
        sequences_per_s=sequences / elapsed,
        batch_size=len(batches[0]),
        batches=len(latencies),
        seconds=elapsed,
        batch_latency_ms={f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)},
        mean_tokens=float(np.mean([job.hidden.shape[0] for job in jobs])),
    )


def load_engine(model: str, threads: int | None) -> InferenceEngine:
    """The server's engine, loaded and warm, used here only for its compute function. ``threads``: torch
    threads, by default what ``splitwire-cloud serve`` uses, so the figure is that of a default server."""
    threads = threads or default_torch_threads()
    config = ServerConfig(model=model, metrics_port=None, torch_threads=threads, compute=ComputeMode.THREAD)
    engine = InferenceEngine(config)
    engine.load()
    return engine


def run(args: argparse.Namespace) -> dict[str, object]:
    engine = load_engine(args.model, args.threads)
    assert engine.model is not None and engine.catalog is not None
    cut = engine.default_cut() if args.split is None else Cut(engine.model.num_blocks, args.split)
    codec = engine.catalog.get(args.codec or engine.default_codec_name(cut.split))
    texts = workload.sentences(args.data, args.sentences)
    jobs = decode_jobs(codec, workload.encode(engine.model, cut, codec, texts).payloads)
    result = measure(engine, cut, jobs, args.batch_size, args.seconds)
    summary = (
        f"{engine.model.name} blocks [{cut.split}, {engine.model.num_blocks}) + head, batch {result.batch_size}, "
        f"{torch.get_num_threads()} torch threads: {result.sequences_per_s:.1f} sequences/s "
        f"(batch p50 {result.batch_latency_ms['p50']:.1f} ms, {result.mean_tokens:.1f} tokens/sequence)"
    )
    print(summary)
    return {
        "model": engine.model.name,
        "split": cut.split,
        "codec": codec.name,
        "torch_threads": torch.get_num_threads(),
        "sentences": len(texts),
        "compute": result.to_json(),
    }
