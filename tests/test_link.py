"""The emulated link and the end-to-end comparison that runs through it.

Link timings are checked only from below: a shaped link can be slower on a busy machine, never faster
than its bandwidth and round trip allow.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from splitwire.benchmarks.link import LinkProfile, NamespaceLink, SimulatedLink, namespaces_permitted, open_link

BIN = Path(sys.executable).parent
PERMITTED, WHY_NOT = namespaces_permitted()

ECHO_SERVER = """
import socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((sys.argv[1], 0))
listener.listen()
print(listener.getsockname()[1], flush=True)
connection, _ = listener.accept()
connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    size = int.from_bytes(connection.recv(4, socket.MSG_WAITALL), "big")
    if not size:
        break
    received = 0
    while received < size:
        received += len(connection.recv(size - received))
    connection.sendall(b"k")
"""


@pytest.mark.parametrize(
    ("text", "bandwidth", "rtt", "loss", "name"),
    [
        ("1mbit/100ms", 1e6, 0.1, 0.0, "1mbit/100ms"),
        ("10Mbit/40ms", 1e7, 0.04, 0.0, "10mbit/40ms"),
        ("500kbit/0.2s/1%", 5e5, 0.2, 0.01, "500kbit/200ms/1%"),
        ("2gbit/0ms", 2e9, 0.0, 0.0, "2gbit/0ms"),
    ],
)
def test_link_profiles_parse_and_name_themselves(text: str, bandwidth: float, rtt: float, loss: float, name: str):
    profile = LinkProfile.parse(text)
    assert (profile.bandwidth_bps, profile.rtt_s, profile.loss) == pytest.approx((bandwidth, rtt, loss))
    assert profile.name == name


@pytest.mark.parametrize("text", ["1mbit", "fast/100ms", "1mbit/soon", "0mbit/10ms", "1mbit/10ms/lots", "1/2/3/4"])
def test_bad_link_profiles_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match="link profile"):
        LinkProfile.parse(text)


def test_simulated_link_adds_serialisation_and_a_round_trip() -> None:
    profile = LinkProfile.parse("1mbit/100ms")
    assert profile.transmission_s(10_000, 2_500) == pytest.approx(0.1 + 12_500 * 8 / 1e6)
    link = open_link(profile, allow_namespaces=False)
    assert isinstance(link, SimulatedLink) and "simulated" in link.mode
    assert link.wrap(["x"]) == ["x"] and link.client_address(5) == "127.0.0.1:5"


def _exchange(address: str, sizes: list[int]) -> list[float]:
    host, port = address.rsplit(":", 1)
    times = []
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for size in sizes:
            started = time.perf_counter()
            connection.sendall(size.to_bytes(4, "big") + bytes(size))
            assert connection.recv(1) == b"k"
            times.append(time.perf_counter() - started)
        connection.sendall(bytes(4))
    return times


@pytest.mark.skipif(not PERMITTED, reason=f"network namespaces not permitted here: {WHY_NOT}")
def test_namespace_link_delays_and_shapes_then_leaves_nothing_behind() -> None:
    profile = LinkProfile.parse("1mbit/60ms")
    with open_link(profile) as link:
        assert isinstance(link, NamespaceLink) and link.mode.startswith("netns+")
        server = subprocess.Popen(
            link.wrap([sys.executable, "-c", ECHO_SERVER, link.far_address]), stdout=subprocess.PIPE, text=True
        )
        try:
            port = int(server.stdout.readline())
            small, large = _exchange(link.client_address(port), [1, 25_000])
        finally:
            server.kill()
            server.wait()
        namespace, device = link.namespace, link.near_device
    assert small >= 0.06  # one round trip
    assert large >= 0.06 + 25_000 * 8 / 1e6 * 0.9  # plus the payload at 1 Mbit/s (tbf's burst lets a little by)
    assert namespace not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", device], capture_output=True).returncode != 0


UDP_COUNTER = """
import socket, sys
receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
receiver.bind((sys.argv[1], 0))
receiver.settimeout(2.0)
print(receiver.getsockname()[1], flush=True)
count = 0
try:
    while True:
        receiver.recv(2048)
        count += 1
except TimeoutError:
    print(count, flush=True)
"""


@pytest.mark.skipif(not PERMITTED, reason=f"network namespaces not permitted here: {WHY_NOT}")
def test_namespace_link_loses_packets_and_tcp_recovers() -> None:
    sent = 1000
    with open_link(LinkProfile.parse("100mbit/10ms/20%")) as link:
        counter = subprocess.Popen(
            link.wrap([sys.executable, "-c", UDP_COUNTER, link.far_address]), stdout=subprocess.PIPE, text=True
        )
        echo = subprocess.Popen(
            link.wrap([sys.executable, "-c", ECHO_SERVER, link.far_address]), stdout=subprocess.PIPE, text=True
        )
        try:
            port = int(counter.stdout.readline())
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                for _ in range(sent):
                    sender.sendto(bytes(100), (link.far_address, port))
                    time.sleep(0.0002)  # 0.6 Mbit/s: well under the rate, so only the loss drops any
            received = int(counter.stdout.readline())
            # TCP retransmits what the link loses: a 200 kB exchange still completes.
            (exchanged,) = _exchange(link.client_address(int(echo.stdout.readline())), [200_000])
        finally:
            for process in (counter, echo):
                process.kill()
                process.wait()
    # 1000 datagrams at 20% loss: 800 expected, standard deviation 12.6.
    assert 700 <= received <= 900, received
    assert exchanged >= 0.01 + 200_000 * 8 / 1e8
    if link.packet_counts:  # the user-space emulator counts what it did
        assert link.packet_counts["up"]["lost"] >= sent - received


@pytest.mark.skipif(not PERMITTED, reason=f"network namespaces not permitted here: {WHY_NOT}")
def test_tun_emulator_survives_packets_for_an_end_that_is_not_up_yet() -> None:
    """The link brings its two ends up one after the other; what the first sends meanwhile is lost."""
    tag = os.getpid() % 100_000
    near, far = f"swt{tag}a", f"swt{tag}b"
    near_address, far_address = f"10.250.{tag % 256}.1", f"10.250.{tag % 256}.2"
    emulator = subprocess.Popen(
        [sys.executable, "-m", "splitwire.benchmarks.tun_link", "--near", near, "--far", far, "--rate-bps", "1e8",
         "--delay-ms", "0", "--queue-bytes", "100000"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert emulator.stdout.readline().strip() == "ready"
        subprocess.run(["ip", "addr", "add", near_address, "peer", far_address, "dev", near], check=True)
        subprocess.run(["ip", "link", "set", near, "up"], check=True)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for _ in range(5):
                sender.sendto(b"x", (far_address, 9))
        time.sleep(0.3)
        assert emulator.poll() is None, "the emulator died on a packet for a device that is down"
    finally:
        emulator.terminate()
        out, _ = emulator.communicate(timeout=5)
    assert emulator.returncode == 0
    up = json.loads(out.splitlines()[-1])["up"]
    assert up["target_drops"] >= 5 and up["delivered"] == 0


def test_compare_runs_every_configuration_through_a_started_server(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    done = subprocess.run(
        [BIN / "splitwire-bench", "compare", "--model", "tiny-bert", "--codecs", "fp16,int8-zstd", "--pairs", "4",
         "--warmup", "1", "--links", "100mbit/20ms", "--device-cpu", "1", "--json", str(out),
         "--plot", str(tmp_path / "compare.png")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    (link,) = result["links"]
    rows = {row["config"]: row for row in link["rows"]}
    assert list(rows) == [
        "split 2 + fp16", "split 2 + int8-zstd", "cloud only (token ids)", "device only (whole model)",
    ]  # fmt: skip
    assert all(row["requests"] == 8 for row in rows.values())
    tokens_row, fp16_row = rows["cloud only (token ids)"], rows["split 2 + fp16"]
    assert tokens_row["split"] == 0 and tokens_row["bits_per_token"] < 24  # 15-bit ids + a 3-byte header
    assert fp16_row["bits_per_token"] > 16 * 32  # tiny-bert is 32 wide
    assert tokens_row["quality"] == pytest.approx(result["unsplit_quality"], abs=1e-3)
    for name, row in rows.items():
        assert row["latency_ms"]["p50"] > 0
        if name != "device only (whole model)":
            assert row["network_and_server_ms"]["p50"] >= 20.0  # the link's round trip, emulated either way
    if link["mode"].startswith("netns+tun"):  # the user-space emulator reports what it forwarded
        assert link["packets"]["up"]["delivered"] > 0 and link["packets"]["down"]["delivered"] > 0
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert "**100mbit/20ms**" in done.stdout and "| split 2 + fp16 |" in done.stdout
