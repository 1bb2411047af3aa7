"""A link emulated packet by packet in user space, for kernels without ``netem``.

::

    client --> tun NEAR (client's namespace) --> this process --> tun FAR (server's namespace) --> server
           <--                               <--              <--

This process opens both tun devices (layer 3, no packet-information header) and forwards every IP packet
between them. Each direction models one wire:

* **rate**: packets leave one at a time, each taking ``bytes x 8 / rate``; those that arrive while the
  wire is busy wait in a FIFO of at most ``queue_bytes`` and are tail-dropped beyond it (as ``tbf``);
* **loss**: each packet that crossed the wire is lost with probability ``loss`` (as ``netem loss``), from
  a seeded generator so a run can be repeated;
* **delay**: what is not lost arrives ``delay`` after it finished crossing (as ``netem delay``): half
  the round trip in each direction.

Everything TCP and gRPC do (slow start, retransmission after a loss, ACK clocking) happens in the
kernels on either side, as on a real link. The caller moves FAR into the server's namespace after this
process prints ``ready`` (a tun device keeps working for the descriptor that opened it wherever it is
moved) and gives both ends their addresses. SIGTERM ends it; the devices vanish with their descriptors,
and one JSON line of per-direction counts goes to standard output.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import heapq
import json
import os
import random
import select
import signal
import struct
import sys
import time
from dataclasses import dataclass, field

_TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_MAX_PACKET = 65535


def open_tun(name: str) -> int:
    """A non-blocking descriptor on a new layer-3 tun device ``name`` (root or CAP_NET_ADMIN)."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    os.set_blocking(fd, False)
    return fd


@dataclass
class Wire:
    """One direction of the link: when each packet arrives at the far end, or None when it does not.

    ``delivered`` counts packets the far end's device took; ``target_drops`` those it refused (its queue
    full, or the device not up yet)."""

    rate_bps: float
    delay_s: float
    loss: float
    queue_bytes: int
    rng: random.Random = field(repr=False)
    busy_until: float = 0.0
    delivered: int = 0
    lost: int = 0
    queue_drops: int = 0
    target_drops: int = 0

    def admit(self, size: int, now: float) -> float | None:
        start = max(now, self.busy_until)
        if (start - now) * self.rate_bps / 8 + size > self.queue_bytes:
            self.queue_drops += 1
            return None
        self.busy_until = start + size * 8 / self.rate_bps
        if self.loss and self.rng.random() < self.loss:
            self.lost += 1
            return None
        return self.busy_until + self.delay_s

    def counts(self) -> dict[str, int]:
        return {
            "delivered": self.delivered,
            "lost": self.lost,
            "queue_drops": self.queue_drops,
            "target_drops": self.target_drops,
        }


def forward(wires: dict[int, tuple[Wire, int]], stop: list[bool]) -> None:
    """Move packets from each source descriptor through its wire to its target until ``stop[0]``."""
    in_flight: list[tuple[float, int, int, bytes, Wire]] = []  # (arrival, sequence, target, packet, wire)
    sequence = 0
    while not stop[0]:
        timeout = max(0.0, in_flight[0][0] - time.monotonic()) if in_flight else 0.5
        readable, _, _ = select.select(list(wires), [], [], timeout)
        now = time.monotonic()
        for source in readable:
            wire, target = wires[source]
            while True:
                try:
                    packet = os.read(source, _MAX_PACKET)
                except BlockingIOError:
                    break
                except OSError:  # the device went away (torn down under us)
                    return
                arrival = wire.admit(len(packet), now)
                if arrival is not None:
                    heapq.heappush(in_flight, (arrival, sequence, target, packet, wire))
                    sequence += 1
        now = time.monotonic()
        while in_flight and in_flight[0][0] <= now:
            _, _, target, packet, wire = heapq.heappop(in_flight)
            try:
                os.write(target, packet)
            except BlockingIOError:  # the kernel's queue is full: the packet is lost
                wire.target_drops += 1
                continue
            except OSError as error:
                if error.errno == errno.EIO:
                    # The target device is not up yet (the caller brings the ends up one after the
                    # other, and the first may already be sending): lost, as on a dead wire.
                    wire.target_drops += 1
                    continue
                return  # the device went away (torn down under us), as on the reading side
            wire.delivered += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitwire.benchmarks.tun_link", description=__doc__.split("\n")[0])
    parser.add_argument("--near", required=True, help="tun device on the client's side")
    parser.add_argument("--far", required=True, help="tun device the caller moves to the server's side")
    parser.add_argument("--rate-bps", type=float, required=True, help="bandwidth of each direction")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay of each direction")
    parser.add_argument("--loss", type=float, default=0.0, help="fraction of packets lost in each direction")
    parser.add_argument("--queue-bytes", type=int, required=True, help="each direction's queue before tail drop")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rate_bps <= 0 or args.delay_ms < 0 or not 0 <= args.loss < 1 or args.queue_bytes <= 0:
        parser.error("rate and queue must be positive, delay non-negative, loss in [0, 1)")
    near, far = open_tun(args.near), open_tun(args.far)
    up, down = (
        Wire(args.rate_bps, args.delay_ms / 1000, args.loss, args.queue_bytes, random.Random(args.seed + i))
        for i in range(2)
    )
    stop = [False]

    def request_stop(*_: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    print("ready", flush=True)
    forward({near: (up, far), far: (down, near)}, stop)
    print(json.dumps({"up": up.counts(), "down": down.counts()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
