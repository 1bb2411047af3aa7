"""An emulated network link between the benchmark client and a cloud server, set up and torn down here.

::

    client (this namespace) ==link==> (namespace sw-link-PID) server
                            <==link==

With namespaces permitted (root or CAP_NET_ADMIN), :class:`NamespaceLink` creates a network namespace for
the server, joined to this one on a private /30 that never leaves the machine, in one of two ways:

* the kernel has ``sch_netem``: a veth pair, each end's egress shaped by ``tbf`` (each direction gets the
  full rate, like a symmetric link) under ``netem`` for the one-way delay and the loss;
* it has not (some container kernels ship none): a pair of tun devices with a user-space emulator
  between them (:mod:`splitwire.benchmarks.tun_link`) that applies rate, delay and loss per packet.

Either way the packets themselves are delayed, shaped and dropped, so TCP on both sides sees the link
as it is. :attr:`NamespaceLink.mode` says which.

When namespaces are not permitted, :class:`SimulatedLink` leaves the server on loopback and the caller
adds ``transmission_s(bytes up, bytes down)`` = bytes x 8 / bandwidth + round trip to each measured
time; results carry ``mode = "simulated"`` so nobody mistakes them for a shaped link.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from types import TracebackType

log = logging.getLogger(__name__)

# Frames on the veth link: 576 bytes, the datagram every IPv4 host must accept, keeps the one frame
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
        self.packet_counts: dict[str, dict[str, int]] = {}  # the tun emulator's, once torn down
        self._emulator: subprocess.Popen[str] | None = None

    def __enter__(self) -> NamespaceLink:
        try:
            _ip("netns", "add", self.namespace)
            _ip("-n", self.namespace, "link", "set", "lo", "up")
            if self._netem_available():
                self._set_up_veth()
                self.mode = "netns+veth+tbf+netem"
            else:
                self._set_up_tun()
                self.mode = "netns+tun, rate/delay/loss by a user-space packet emulator (no netem in this kernel)"
        except BaseException:
            self._tear_down()
            raise
        log.info("link %s up: %s, server side %s in %s", self.profile.name, self.mode, self.far_address, self.namespace)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._tear_down()

    @property
    def _queue_bytes(self) -> int:
        """Each direction queues a second of traffic (at least 64 full frames): a burst of requests
        waits rather than being dropped."""
        return max(64 * 1514, int(self.profile.bandwidth_bps / 8))

    def _netem_available(self) -> bool:
        """Try netem on the namespace's loopback (some container kernels have no sch_netem)."""
        tried = subprocess.run(
            ["tc", "-n", self.namespace, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
            capture_output=True,
        )
        if tried.returncode != 0:
            return False
        _tc("-n", self.namespace, "qdisc", "del", "dev", "lo", "root")
        return True

    def _set_up_veth(self) -> None:
        _ip("link", "add", self.near_device, "type", "veth", "peer", "name", self._far, "netns", self.namespace)
        _ip("link", "set", self.near_device, "mtu", str(LINK_MTU))
        _ip("-n", self.namespace, "link", "set", self._far, "mtu", str(LINK_MTU))
        _ip("addr", "add", f"{self.near_address}/30", "dev", self.near_device)
        _ip("link", "set", self.near_device, "up")
        _ip("-n", self.namespace, "addr", "add", f"{self.far_address}/30", "dev", self._far)
        _ip("-n", self.namespace, "link", "set", self._far, "up")
        for namespace, device in ((None, self.near_device), (self.namespace, self._far)):
            self._shape(namespace, device)

    def _shape(self, namespace: str | None, device: str) -> None:
        """Egress of ``device``: netem's one-way delay and loss, tbf at the link rate below it."""
        prefix = ["-n", namespace] if namespace else []
        rate = f"{int(self.profile.bandwidth_bps)}bit"
        # A token bucket lets its size through at once after an idle spell, so it holds one frame (or
        # 0.1 ms of traffic on fast links) and frames are small (LINK_MTU): a small request still pays
        # nearly its whole serialisation time.
        burst = max(LINK_MTU + 24, int(self.profile.bandwidth_bps / 8 / 10_000))
        tbf = ["tbf", "rate", rate, "burst", str(burst), "limit", str(self._queue_bytes)]
        netem = ["netem", "delay", f"{self.profile.rtt_s * 500:.3f}ms", "limit", "100000"]
        if self.profile.loss:
            netem += ["loss", f"{self.profile.loss * 100:g}%"]
        _tc(*prefix, "qdisc", "add", "dev", device, "root", "handle", "1:", *netem)
        _tc(*prefix, "qdisc", "add", "dev", device, "parent", "1:1", "handle", "10:", *tbf)

    def _set_up_tun(self) -> None:
        self._emulator = subprocess.Popen(
            [sys.executable, "-m", "splitwire.benchmarks.tun_link", "--near", self.near_device, "--far", self._far,
             "--rate-bps", str(self.profile.bandwidth_bps), "--delay-ms", str(self.profile.rtt_s * 500),
             "--loss", str(self.profile.loss), "--queue-bytes", str(self._queue_bytes)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self._emulator.stdout is not None
        line = self._emulator.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the packet emulator did not start (exit {self._emulator.poll()}): {line!r}")
        _ip("link", "set", self._far, "netns", self.namespace)
        _ip("addr", "add", self.near_address, "peer", self.far_address, "dev", self.near_device)
        _ip("link", "set", self.near_device, "up")
        _ip("-n", self.namespace, "addr", "add", self.far_address, "peer", self.near_address, "dev", self._far)
        _ip("-n", self.namespace, "link", "set", self._far, "up")

    def _tear_down(self) -> None:
        if self._emulator is not None:
            self._emulator.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                out, _ = self._emulator.communicate(timeout=5)
                with contextlib.suppress(ValueError):
                    self.packet_counts = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
            if self._emulator.poll() is None:
                self._emulator.kill()
                self._emulator.wait()
            self._emulator = None
        # Deleting the namespace deletes the far device with it; the tun devices go with the emulator.
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", self.near_device], capture_output=True)

    def wrap(self, command: list[str]) -> list[str]:
        """``command`` run inside the server's namespace."""
        return ["ip", "netns", "exec", self.namespace, *command]

    def client_address(self, server_port: int) -> str:
        """What the client dials to reach a server listening on ``far_address:server_port`` through the link."""
        return f"{self.far_address}:{server_port}"


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
