"""Thousands of malformed payloads against a live server: each one is refused with INVALID_ARGUMENT (or,
for a corrupted entropy-coded or float body that still decodes to finite values, answered), the server
keeps serving, and its memory stays bounded."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import ServerThread
from splitwire.cloud.config import ComputeMode, ServerConfig
from splitwire.codec.base import Codec
from splitwire.edge.agent import EdgeAgent, EdgeConfig
from splitwire.split.models import LoadedModel
from splitwire.split.transport import channel_options
from splitwire.v1 import splitwire_pb2 as pb
from splitwire.v1 import splitwire_pb2_grpc as pb_grpc
from test_fuzz import varint

PAYLOADS = 3000
CONCURRENCY = 16
RSS_GROWTH_BOUND = 150 * 2**20  # an allocation sized by a forged header would be terabytes


def rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def hostile_payloads(codec: Codec, count: int, seed: int) -> list[bytes]:
    """Random bytes, truncations and bit flips of valid payloads, junk appended, and forged headers."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    valid = [codec.encode_payload(torch.randn(t, codec.width, generator=generator)) for t in (1, 7, 20)]
    out: list[bytes] = []
    while len(out) < count:
        base = bytearray(valid[int(rng.integers(len(valid)))])
        how = int(rng.integers(6))
        if how == 0:
            out.append(rng.bytes(int(rng.integers(0, 3000))))
        elif how == 1:
            out.append(bytes(base[: int(rng.integers(0, len(base)))]))
        elif how == 2:
            for _ in range(int(rng.integers(1, 6))):
                base[int(rng.integers(len(base)))] ^= 1 << int(rng.integers(8))
            out.append(bytes(base))
        elif how == 3:
            out.append(bytes(base) + rng.bytes(int(rng.integers(1, 100))))
        elif how == 4:  # a header claiming a huge shape over a small body
            tokens = int(rng.choice([257, 4096, 2**20, 2**31, 2**35 - 1]))
            flags = int(rng.choice([0x00, 0x40, 0x80, 0xC0]))
            header = bytes([0x51, flags | int(codec.kind)]) + varint(tokens)
            if flags & 0x40:
                header += varint(int(rng.choice([codec.width, 2**20, 2**35 - 1])))
            out.append(header + rng.bytes(int(rng.integers(0, 200))))
        else:  # the right token count but the body of another length, or another codec's kind
            kind = int(rng.integers(0, 32))
            out.append(bytes([0x51, kind]) + bytes(base[2:]))
    return out


async def send_all(address: str, requests: list[pb.InferRequest]) -> collections.Counter[grpc.StatusCode]:
    codes: collections.Counter[grpc.StatusCode] = collections.Counter()
    details: dict[grpc.StatusCode, str] = {}
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = pb_grpc.SplitInferenceStub(channel)
        work: asyncio.Queue[pb.InferRequest] = asyncio.Queue()
        for request in requests:
            work.put_nowait(request)

        async def worker() -> None:
            while not work.empty():
                request = work.get_nowait()
                try:
                    await stub.Infer(request, timeout=30)
                    codes[grpc.StatusCode.OK] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code()] += 1
                    details.setdefault(exc.code(), exc.details() or "")
                    assert exc.details(), "a refusal must say why"

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    unexpected = set(codes) - {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
    assert not unexpected, {code: details.get(code) for code in unexpected}
    return codes


@pytest.fixture(scope="module")
def minilm_process_server() -> Iterator[ServerThread]:
    """The default layout: payloads are decoded in the compute process."""
    config = ServerConfig(port=0, metrics_port=0, model="all-MiniLM-L6-v2", max_queue_delay_ms=1.0)
    assert config.compute is ComputeMode.PROCESS
    with ServerThread(config) as running:
        yield running


@pytest.mark.parametrize("layout", ["compute thread", "compute process"])
def test_thousands_of_hostile_payloads_leave_the_server_serving_within_bounded_memory(
    layout: str, request: pytest.FixtureRequest, minilm: LoadedModel
) -> None:
    server: ServerThread = request.getfixturevalue(
        "minilm_server" if layout == "compute thread" else "minilm_process_server"
    )
    engine = server.server.engine
    child = getattr(engine._back, "pid", None)  # the compute process, where payloads are decoded

    def memory() -> int:
        return rss_bytes() + (rss_bytes(child) if child is not None else 0)

    assert engine.catalog is not None
    split = engine.default_cut().split
    codecs = [codec for codec in engine.catalog if codec.valid_at(split)]
    assert len(codecs) >= 4
    per_codec = PAYLOADS // len(codecs) + 1
    requests = [
        pb.InferRequest(codec=codec.name, split=split, payload=payload)
        for index, codec in enumerate(codecs)
        for payload in hostile_payloads(codec, per_codec, seed=index)
    ]
    asyncio.run(send_all(server.address, requests[:300]))  # warm up allocators and caches
    before = memory()
    codes = asyncio.run(send_all(server.address, requests))
    growth = memory() - before
    assert sum(codes.values()) >= PAYLOADS
    assert codes[grpc.StatusCode.INVALID_ARGUMENT] > 0.8 * sum(codes.values())
    assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth / 2**20:.0f} MiB"
    assert child is None or getattr(engine._back, "pid", None) == child  # no payload took the child down
    with EdgeAgent(EdgeConfig(server=server.address), minilm) as edge:
        result = edge.infer("After all that, a valid request.")
    assert result.embedding is not None and np.isfinite(result.embedding).all()
