"""An emulated network link between the benchmark client and a cloud server, set up and torn down here.

::

    client (this namespace) --[delay relay]--> veth a ==tbf==> veth b (namespace sw-PID) --> server
                            <--[delay relay]-- veth a <==tbf== veth b

With namespaces permitted (root or CAP_NET_ADMIN), :class:`NamespaceLink` creates a network namespace for
the server and a veth pair between it and this namespace, on a private /30 that never leaves the machine.
Bandwidth is shaped by ``tbf`` on both ends (each direction gets the full rate, like a symmetric link).
Delay and loss come from ``netem`` when the kernel has it; without it (some container kernels ship no
``sch_netem``) a relay process delays every byte by half the round trip in each direction, and loss
cannot be emulated: :attr:`NamespaceLink.mode` says which.

When namespaces are not permitted, :class:`SimulatedLink` leaves the server on loopback and the caller
adds ``transmission_s(bytes up, bytes down)`` = bytes x 8 / bandwidth + round trip to each measured
time; results carry ``mode = "simulated"`` so nobody mistakes them for a shaped link.

``python -m splitwire.benchmarks.link relay --listen 127.0.0.1:0 --target H:P --delay-ms D`` runs the relay
on its own (it prints ``relaying PORT``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from types import TracebackType

log = logging.getLogger(__name__)

# Frames on the emulated link: 576 bytes, the datagram every IPv4 host must accept, keeps the one frame
# a token bucket lets through unshaped short (4.8 ms at 1 Mbit/s instead of 12 ms with 1,500).
LINK_MTU = 576
_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


@dataclass(frozen=True)
class LinkProfile:
    """A symmetric link: each direction carries ``bandwidth_bps``; a request costs one ``rtt_s``."""

    bandwidth_bps: float
    rtt_s: float
    loss: float = 0.0  # fraction of packets dropped in each direction (netem only)

    @classmethod
    def parse(cls, text: str) -> LinkProfile:
        """``1mbit/100ms`` or ``10mbit/40ms/0.1%`` (bandwidth / round trip [/ loss])."""
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3):
            raise ValueError(f"link profile {text!r}: expected BANDWIDTH/RTT[/LOSS], e.g. 1mbit/100ms")
        rate = re.fullmatch(r"([\d.]+)\s*([kmg]?)bit", parts[0])
        delay = re.fullmatch(r"([\d.]+)\s*(ms|s)", parts[1])
        if rate is None or delay is None:
            raise ValueError(f"link profile {text!r}: bandwidth like 1mbit or 500kbit, round trip like 100ms")
        bandwidth = float(rate.group(1)) * _UNITS[rate.group(2)]
        rtt = float(delay.group(1)) / (1000.0 if delay.group(2) == "ms" else 1.0)
        loss = 0.0
        if len(parts) == 3:
            match = re.fullmatch(r"([\d.]+)%", parts[2])
            if match is None:
                raise ValueError(f"link profile {text!r}: loss like 0.1%")
            loss = float(match.group(1)) / 100.0
        if bandwidth <= 0 or rtt < 0 or not 0 <= loss < 1:
            raise ValueError(f"link profile {text!r}: bandwidth must be positive, round trip and loss non-negative")
        return cls(bandwidth, rtt, loss)

    @property
    def name(self) -> str:
        rate = next(
            f"{self.bandwidth_bps / scale:g}{unit}bit"
            for unit, scale in (("g", 1e9), ("m", 1e6), ("k", 1e3), ("", 1.0))
            if self.bandwidth_bps >= scale
        )
        loss = f"/{self.loss * 100:g}%" if self.loss else ""
        return f"{rate}/{self.rtt_s * 1000:g}ms{loss}"

    def transmission_s(self, bytes_up: int, bytes_down: int) -> float:
        """What the link adds to one request and its answer: serialisation both ways plus a round trip."""
        return (bytes_up + bytes_down) * 8.0 / self.bandwidth_bps + self.rtt_s


def namespaces_permitted() -> tuple[bool, str]:
    """Whether this process may create network namespaces and shape veth links, and why not."""
    if sys.platform != "linux":
        return False, "network namespaces are Linux only"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"{tool} (iproute2) is not installed"
    probe = f"swprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return False, f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True, ""


def _ip(*arguments: str) -> None:
    done = subprocess.run(["ip", *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(arguments)}: {done.stderr.strip()}")


def _tc(*arguments: str) -> None:
    done = subprocess.run(["tc", *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tc {' '.join(arguments)}: {done.stderr.strip()}")


class NamespaceLink:
    """The server's side of the link is a network namespace; see the module docstring."""

    def __init__(self, profile: LinkProfile) -> None:
        self.profile = profile
        tag = os.getpid() % 100_000
        self.namespace = f"sw-link-{tag}"
        self.near_device, self._far = f"swl{tag}a", f"swl{tag}b"
        # A private /30 per process: 10.(200 + pid / 16384 % 50).x.y, never routed anywhere.
        network = ipaddress.ip_network(f"10.{200 + tag // 16384 % 50}.{(tag // 64) % 256}.{(tag % 64) * 4}/30")
        self.near_address, self.far_address = (str(a) for a in network.hosts())
        self.mode = ""
        self._relays: list[subprocess.Popen[str]] = []

    def __enter__(self) -> NamespaceLink:
        try:
            self._set_up()
        except BaseException:
            self._tear_down()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._tear_down()

    def _set_up(self) -> None:
        _ip("netns", "add", self.namespace)
        _ip("link", "add", self.near_device, "type", "veth", "peer", "name", self._far, "netns", self.namespace)
        _ip("link", "set", self.near_device, "mtu", str(LINK_MTU))
        _ip("-n", self.namespace, "link", "set", self._far, "mtu", str(LINK_MTU))
        _ip("addr", "add", f"{self.near_address}/30", "dev", self.near_device)
        _ip("link", "set", self.near_device, "up")
        _ip("-n", self.namespace, "addr", "add", f"{self.far_address}/30", "dev", self._far)
        _ip("-n", self.namespace, "link", "set", self._far, "up")
        _ip("-n", self.namespace, "link", "set", "lo", "up")
        netem = self._netem_available()
        for namespace, device in ((None, self.near_device), (self.namespace, self._far)):
            self._shape(namespace, device, netem)
        self.mode = "netns+tbf+netem" if netem else "netns+tbf, delay by relay (no netem in this kernel)"
        if not netem and self.profile.loss:
            raise RuntimeError("packet loss needs netem, which this kernel lacks; use a profile without loss")
        log.info("link %s up: %s, server side %s in %s", self.profile.name, self.mode, self.far_address, self.namespace)

    def _netem_available(self) -> bool:
        """Try netem on the near device (some container kernels have no sch_netem)."""
        tried = subprocess.run(
            ["tc", "qdisc", "add", "dev", self.near_device, "root", "netem", "delay", "1ms"], capture_output=True
        )
        if tried.returncode != 0:
            return False
        _tc("qdisc", "del", "dev", self.near_device, "root")
        return True

    def _shape(self, namespace: str | None, device: str, netem: bool) -> None:
        """Egress of ``device``: tbf at the link rate, below netem's one-way delay and loss when present."""
        prefix = ["-n", namespace] if namespace else []
        rate = f"{int(self.profile.bandwidth_bps)}bit"
        # A token bucket lets its size through at once after an idle spell, so it holds one frame (or
        # 0.1 ms of traffic on fast links) and frames are small (LINK_MTU): a small request still pays
        # nearly its whole serialisation time. The queue holds a second of traffic, so a burst of
        # requests waits rather than being dropped.
        burst = max(LINK_MTU + 24, int(self.profile.bandwidth_bps / 8 / 10_000))
        limit = max(64 * 1514, int(self.profile.bandwidth_bps / 8))
        tbf = ["tbf", "rate", rate, "burst", str(burst), "limit", str(limit)]
        if netem:
            one_way = f"{self.profile.rtt_s * 500:.3f}ms"
            netem_args = ["netem", "delay", one_way, "limit", "100000"]
            if self.profile.loss:
                netem_args += ["loss", f"{self.profile.loss * 100:g}%"]
            _tc(*prefix, "qdisc", "add", "dev", device, "root", "handle", "1:", *netem_args)
            _tc(*prefix, "qdisc", "add", "dev", device, "parent", "1:1", "handle", "10:", *tbf)
        else:
            _tc(*prefix, "qdisc", "add", "dev", device, "root", *tbf)

    def _tear_down(self) -> None:
        for relay in self._relays:
            relay.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                relay.wait(timeout=5)
        self._relays.clear()
        # Deleting the namespace deletes the veth pair with it.
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", self.near_device], capture_output=True)

    def wrap(self, command: list[str]) -> list[str]:
        """``command`` run inside the server's namespace."""
        return ["ip", "netns", "exec", self.namespace, *command]

    def client_address(self, server_port: int) -> str:
        """What the client dials to reach a server listening on ``far_address:server_port`` through the link."""
        target = f"{self.far_address}:{server_port}"
        if self.mode.startswith("netns+tbf+netem"):
            return target
        relay = subprocess.Popen(
            [sys.executable, "-m", "splitwire.benchmarks.link", "relay", "--listen", "127.0.0.1:0",
             "--target", target, "--delay-ms", str(self.profile.rtt_s * 500)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self._relays.append(relay)
        assert relay.stdout is not None
        line = relay.stdout.readline()
        match = re.match(r"relaying (\d+)", line)
        if match is None:
            raise RuntimeError(f"the delay relay did not start: {line!r}")
        return f"127.0.0.1:{match.group(1)}"


class SimulatedLink:
    """No shaping at all: the server stays on loopback and callers add :meth:`LinkProfile.transmission_s`."""

    mode = "simulated (bytes / bandwidth + round trip added to loopback times)"

    def __init__(self, profile: LinkProfile) -> None:
        self.profile = profile
        self.far_address = "127.0.0.1"

    def __enter__(self) -> SimulatedLink:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def wrap(self, command: list[str]) -> list[str]:
        return command

    def client_address(self, server_port: int) -> str:
        return f"127.0.0.1:{server_port}"


def open_link(profile: LinkProfile, allow_namespaces: bool = True) -> NamespaceLink | SimulatedLink:
    """A shaped link when namespaces are permitted, else the labelled simulation."""
    if allow_namespaces:
        permitted, why = namespaces_permitted()
        if permitted:
            return NamespaceLink(profile)
        log.warning("network namespaces not permitted (%s): simulating the link", why)
    return SimulatedLink(profile)


# -- the delay relay ----------------------------------------------------------------------------


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Forward bytes from ``reader`` to ``writer``, each chunk ``delay_s`` after it arrived, in order."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, chunk = await queue.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if not chunk:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()

    delivery = asyncio.create_task(deliver())
    try:
        while True:
            chunk = await reader.read(65536)
            await queue.put((time.monotonic() + delay_s, chunk))
            if not chunk:
                break
        await delivery
    except (ConnectionError, OSError):
        delivery.cancel()


async def _relay(listen: str, target: str, delay_s: float) -> None:
    target_host, target_port = target.rsplit(":", 1)

    async def connection(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(target_host, int(target_port))
        except OSError:
            client_writer.close()
            return
        for writer in (client_writer, server_writer):
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(
            _pump(client_reader, server_writer, delay_s),
            _pump(server_reader, client_writer, delay_s),
            return_exceptions=True,
        )
        for writer in (client_writer, server_writer):
            writer.close()

    host, port = listen.rsplit(":", 1)
    server = await asyncio.start_server(connection, host, int(port))
    print(f"relaying {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitwire.benchmarks.link", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    relay = sub.add_parser("relay", help="forward TCP connections, delaying each direction by --delay-ms")
    relay.add_argument("--listen", default="127.0.0.1:0")
    relay.add_argument("--target", required=True, metavar="HOST:PORT")
    relay.add_argument("--delay-ms", type=float, required=True, help="one-way delay added in each direction")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_relay(args.listen, args.target, args.delay_ms / 1000.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
