"""The load generator's worker: a closed loop of ``concurrency`` outstanding Infer calls on one asyncio
channel, sending pre-serialised requests and leaving responses unparsed (like ghz), so the client spends
as little CPU per call as gRPC allows. Several workers run in separate processes.

Each worker warms up for ``warmup_s``, then counts what completes in the next ``duration_s``.
Imports stay light: workers start with the ``spawn`` method and never load torch.
"""

from __future__ import annotations

import asyncio
import collections
import resource
import time
from dataclasses import dataclass, field

import grpc
from splitwire.split.security import ClientSecurity
from splitwire.split.transport import SERVICE_NAME, channel_options

INFER_METHOD = f"/{SERVICE_NAME}/Infer"


@dataclass(frozen=True)
class WorkerPlan:
    address: str
    requests: list[bytes]  # serialised InferRequests, sent round-robin
    metadata: tuple[tuple[str, str], ...]  # fingerprints; the token is added from ``security``
    concurrency: int
    start_at: float  # time.time() at which to start sending, shared by all workers
    warmup_s: float
    duration_s: float
    timeout_s: float
    security: ClientSecurity = field(default_factory=ClientSecurity)
    offset: int = 0  # where in ``requests`` this worker starts


@dataclass
class WorkerStats:
    latencies_s: list[float]  # of calls completed OK inside the window
    codes: dict[str, int]  # every call completed inside the window, by status code name
    errors: dict[str, str]  # one details string per failing code
    cpu_s: float  # user + system CPU of this process inside the window
    window_s: float


def run_worker(plan: WorkerPlan) -> WorkerStats:
    """Entry point of a worker process."""
    return asyncio.run(_drive(plan))


async def _drive(plan: WorkerPlan) -> WorkerStats:
    metadata = (*plan.security.metadata(), *plan.metadata)
    async with plan.security.open_aio_channel(plan.address, channel_options()) as channel:
        infer = channel.unary_unary(INFER_METHOD)  # bytes in, bytes out: no protobuf work on the client
        await asyncio.wait_for(channel.channel_ready(), plan.timeout_s)
        await asyncio.sleep(max(0.0, plan.start_at - time.time()))
        window_start = time.perf_counter() + plan.warmup_s
        window_end = window_start + plan.duration_s
        latencies: list[float] = []
        codes: collections.Counter[str] = collections.Counter()
        errors: dict[str, str] = {}
        cpu: list[float] = []
        next_index = plan.offset

        async def meter() -> None:
            for moment in (window_start, window_end):
                await asyncio.sleep(max(0.0, moment - time.perf_counter()))
                cpu.append(_cpu_seconds())

        async def loop() -> None:
            nonlocal next_index
            while True:
                request = plan.requests[next_index % len(plan.requests)]
                next_index += 1
                sent = time.perf_counter()
                if sent >= window_end:
                    return
                try:
                    await infer(request, timeout=plan.timeout_s, metadata=metadata)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                    errors.setdefault(code, exc.details() or "")
                done = time.perf_counter()
                if window_start <= done < window_end:
                    codes[code] += 1
                    if code == "OK":
                        latencies.append(done - sent)

        await asyncio.gather(meter(), *(loop() for _ in range(plan.concurrency)))
    return WorkerStats(latencies, dict(codes), errors, cpu[1] - cpu[0], plan.duration_s)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
