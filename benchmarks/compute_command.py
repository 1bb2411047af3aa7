"""``splitwire-bench compute``: the back half's pure batched throughput, the ceiling a server can reach.

The server's own compute function (:class:`~splitwire.cloud.back.BackHalf`: pad to the longest sequence,
mask, blocks [k, L), head) runs on batches of ``--batch-size`` decoded STS-B dev payloads, back to back
in this process with the server's torch threads, after warm-up. No gRPC, no decoding, no queueing, no
compute process: what is left when serving costs nothing.

With ``--with-decoding`` each batch starts from the payloads and decodes them first, as the compute
process does: the compute process's ceiling, and against the plain figure, what decoding costs it.

::

    payloads --decode (off the clock)--> jobs --[batch of B]--> run_back --> sequences / second
    payloads --parse (off the clock)--> coded jobs --[batch of B]--> run_coded --> sequences / second
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from splitwire.benchmarks import workload
from splitwire.cloud.back import BackJob, CodedJob, kept_positions
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


def coded_jobs(codec: Codec, payloads: list[bytes]) -> list[CodedJob]:
    """What the compute process receives for each payload: its header parsed, its body still coded."""
    return [CodedJob(codec.name, *codec.parse_payload(payload)) for payload in payloads]


def measure(
    engine: InferenceEngine,
    cut: Cut,
    jobs: list[BackJob] | list[CodedJob],
    batch_size: int,
    seconds: float,
    warmup_batches: int = 3,
) -> ComputeResult:
    """Run consecutive batches of ``jobs`` (cycling) for about ``seconds`` after ``warmup_batches``: the back
    half on decoded jobs, or decoding and the back half on coded ones."""
    if not jobs:
        raise ValueError("no jobs to compute")
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs) - batch_size + 1, batch_size)] or [jobs]
    run_batch = engine.run_coded if isinstance(jobs[0], CodedJob) else engine.run_back
    for batch in batches[:warmup_batches]:
        run_batch(cut, batch)  # type: ignore[arg-type]
    latencies: list[float] = []
    sequences = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or not latencies:
        batch = batches[len(latencies) % len(batches)]
        t0 = time.perf_counter()
        run_batch(cut, batch)  # type: ignore[arg-type]
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
        mean_tokens=float(np.mean([_kept_tokens(job) for job in jobs])),
    )


def _kept_tokens(job: BackJob | CodedJob) -> int:
    return job.header.kept_tokens if isinstance(job, CodedJob) else job.hidden.shape[0]


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
    payloads = workload.encode(engine.model, cut, codec, texts).payloads
    jobs = coded_jobs(codec, payloads) if args.with_decoding else decode_jobs(codec, payloads)
    result = measure(engine, cut, jobs, args.batch_size, args.seconds)
    work = f"decoding {codec.name} + " if args.with_decoding else ""
    summary = (
        f"{engine.model.name} {work}blocks [{cut.split}, {engine.model.num_blocks}) + head, batch {result.batch_size}, "
        f"{torch.get_num_threads()} torch threads: {result.sequences_per_s:.1f} sequences/s "
        f"(batch p50 {result.batch_latency_ms['p50']:.1f} ms, {result.mean_tokens:.1f} tokens/sequence)"
    )
    print(summary)
    return {
        "model": engine.model.name,
        "split": cut.split,
        "codec": codec.name,
        "with_decoding": args.with_decoding,
        "torch_threads": torch.get_num_threads(),
        "sentences": len(texts),
        "compute": result.to_json(),
    }
