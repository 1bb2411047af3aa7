"""The load generator's worker: pre-serialised requests on one asyncio channel, responses left unparsed
(like ghz), so the client spends as little CPU per call as gRPC allows. Several workers run in separate
processes and report one :class:`WindowStats` per measurement window to the parent, which decides when
the figures are stable and sets ``stop``.

Two ways to load the server:

* closed loop (``concurrency`` > 0): that many calls outstanding, each sent as the last one returns;
* open loop (``rate`` > 0): Poisson arrivals at ``rate`` calls a second whatever the server does, each
  call's latency counted from its scheduled send time, so a server that falls behind cannot hide it
  (no coordinated omission).

Each worker warms up for ``warmup_s``; window ``k`` then spans ``[t0 + k w, t0 + (k + 1) w)`` and counts
the calls that complete inside it. Imports stay light: workers start with ``spawn`` and never load torch.
"""

from __future__ import annotations

import asyncio
import collections
import random
import resource
import time
from dataclasses import dataclass, field

import grpc
from splitwire.split.security import ClientSecurity
from splitwire.split.transport import SERVICE_NAME, channel_options

INFER_METHOD = f"/{SERVICE_NAME}/Infer"
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"


@dataclass(frozen=True)
class WorkerPlan:
    address: str
    requests: list[bytes]  # serialised requests, sent round-robin
    metadata: tuple[tuple[str, str], ...]  # fingerprints; the token is added from ``security``
    start_at: float  # time.time() at which to start sending, shared by all workers
    warmup_s: float
    window_s: float
    max_windows: int
    timeout_s: float
    concurrency: int = 0  # closed loop: calls outstanding
    rate: float = 0.0  # open loop: Poisson arrivals per second
    method: str = INFER_METHOD
    security: ClientSecurity = field(default_factory=ClientSecurity)
    offset: int = 0  # where in ``requests`` this worker starts
    seed: int = 0


@dataclass
class WindowStats:
    worker: int
    window: int
    latencies_s: list[float]  # of calls completed OK inside the window
    codes: dict[str, int]  # every call completed inside the window, by status code name
    errors: dict[str, str]  # one details string per failing code
    cpu_s: float  # user + system CPU of this worker's process inside the window


def run_worker(plan: WorkerPlan, worker: int, reports, stop) -> None:
    """Entry point of a worker process: ``reports`` (a queue) gets each window, ``stop`` (an event) ends it."""
    asyncio.run(_drive(plan, worker, reports, stop))


async def _drive(plan: WorkerPlan, worker: int, reports, stop) -> None:
    metadata = (*plan.security.metadata(), *plan.metadata)
    async with plan.security.open_aio_channel(plan.address, channel_options()) as channel:
        call = channel.unary_unary(plan.method)  # bytes in, bytes out: no protobuf work on the client
        await asyncio.wait_for(channel.channel_ready(), plan.timeout_s)
        await asyncio.sleep(max(0.0, plan.start_at - time.time()))
        t0 = time.perf_counter() + plan.warmup_s
        windows: dict[int, WindowStats] = collections.defaultdict(
            lambda: WindowStats(worker, -1, [], collections.Counter(), {}, 0.0)
        )
        next_index = plan.offset
        done = asyncio.Event()

        async def one(scheduled: float) -> None:
            nonlocal next_index
            request = plan.requests[next_index % len(plan.requests)]
            next_index += 1
            try:
                await call(request, timeout=plan.timeout_s, metadata=metadata)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                windows[-1].errors.setdefault(code, exc.details() or "")
            finished = time.perf_counter()
            if finished >= t0:
                stats = windows[int((finished - t0) // plan.window_s)]
                stats.codes[code] += 1
                if code == "OK":
                    stats.latencies_s.append(finished - scheduled)

        async def closed_loop() -> None:
            while not done.is_set():
                await one(time.perf_counter())

        async def open_loop() -> None:
            arrivals = random.Random(plan.seed)
            pending: set[asyncio.Task[None]] = set()
            scheduled = time.perf_counter()
            while not done.is_set():
                scheduled += arrivals.expovariate(plan.rate)
                await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
                task = asyncio.create_task(one(scheduled))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.gather(*pending)

        async def report() -> None:
            """Send each window once it is over; stop when told to or after ``max_windows``."""
            loop = asyncio.get_running_loop()
            await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
            cpu_at_start = _cpu_seconds()
            for k in range(plan.max_windows):
                end = t0 + (k + 1) * plan.window_s
                while time.perf_counter() < end:  # the parent may decide while this window runs
                    if await loop.run_in_executor(None, stop.is_set):
                        done.set()
                        return
                    await asyncio.sleep(min(0.1, max(0.0, end - time.perf_counter())))
                cpu_now = _cpu_seconds()
                stats = windows.pop(k, None) or WindowStats(worker, k, [], {}, {}, 0.0)
                stats.window, stats.cpu_s, cpu_at_start = k, cpu_now - cpu_at_start, cpu_now
                stats.codes, stats.errors = dict(stats.codes), {**windows[-1].errors, **stats.errors}
                await loop.run_in_executor(None, reports.put, stats)
            done.set()

        loops = [closed_loop() for _ in range(plan.concurrency)] if plan.concurrency else [open_loop()]
        await asyncio.gather(report(), *loops)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
