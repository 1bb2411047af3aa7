"""The console scripts as a user runs them: real processes, real ports, real signals."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BIN, start_cloud_process
from splitwire.codec.container import parse


@pytest.fixture(scope="module")
def cloud() -> Iterator[tuple[subprocess.Popen, str]]:
    process, address = start_cloud_process()
    yield process, address
    if process.poll() is None:
        process.kill()
        process.wait()


def edge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "splitwire-edge", *args], capture_output=True, text=True, timeout=120)


def test_run_prints_one_json_object_per_input_and_saves_the_payload(cloud, tmp_path: Path) -> None:
    _, address = cloud
    saved = tmp_path / "payload.bin"
    done = edge("run", "--server", address, "--codec", "fp16", "--json", "--save-payload", str(saved), "Hello world")
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.strip().splitlines()
    result = json.loads(line)
    assert result["tokens"] == 4 and result["codec"] == "fp16" and result["split"] == 5
    assert len(result["embedding"]) == 384
    assert result["payload_bytes"] == saved.stat().st_size == 3 + 4 * 384 * 2
    assert result["bits_per_token"] == pytest.approx(result["payload_bytes"] * 8 / 4, abs=1e-3)
    assert {"front", "encode", "round_trip", "total"} <= set(result["timings_ms"])
    header, _ = parse(saved.read_bytes(), width=384)
    assert (header.tokens, header.width) == (4, 384)


def test_run_several_texts_and_similarity(cloud) -> None:
    _, address = cloud
    done = edge("run", "--server", address, "--json", "First text.", "Second, longer text here.")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 2
    done = edge("similarity", "--server", address, "A man is playing a guitar.", "A man plays the guitar.")
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split()[0]) > 0.8


def test_bench_demo_scores_pairs_through_the_server_per_codec(cloud, tmp_path: Path) -> None:
    _, address = cloud
    out = tmp_path / "demo.json"
    done = subprocess.run(
        [BIN / "splitwire-bench", "--threads", "1", "demo", "--server", address, "--pairs", "8", "--show", "2",
         "--codecs", "fp32,hyperprior-s5-l800", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # Every codec's row in the per-pair table carries its whole name and one cosine per shown pair.
    (learned_row,) = [line for line in lines if line.split()[:1] == ["hyperprior-s5-l800"] and len(line.split()) == 3]
    assert all(0.0 < float(cell) <= 1.0 for cell in learned_row.split()[1:])
    result = json.loads(out.read_text())
    assert result["codecs"]["fp32"]["spearman"] == pytest.approx(result["unsplit_spearman"], abs=0.01)
    learned = result["codecs"]["hyperprior-s5-l800"]
    assert 0 < learned["bits_per_token"] < result["codecs"]["fp32"]["bits_per_token"] / 50


def test_edge_reports_a_refused_codec_clearly(cloud) -> None:
    _, address = cloud
    done = edge("run", "--server", address, "--codec", "nope", "text")
    assert done.returncode == 1
    assert "unknown codec 'nope'" in done.stderr


def test_edge_reports_an_unreachable_server(cloud) -> None:
    done = edge("run", "--server", "127.0.0.1:1", "--timeout", "2", "text")
    assert done.returncode == 1
    assert "cannot reach splitwire-cloud at 127.0.0.1:1" in done.stderr


def test_health_command_exits_0_for_a_serving_server_and_1_for_an_unreachable_one(cloud) -> None:
    _, address = cloud
    health = [BIN / "splitwire-cloud", "health", "--timeout", "5"]
    done = subprocess.run([*health, "--server", address], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "SERVING" in done.stdout, done.stderr
    done = subprocess.run([*health, "--server", "127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr
    # The same check without the server's imports, as the container image runs it.
    probe = [BIN / "python", "-m", "splitwire.cloud.probe", "--server", address]
    done = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "SERVING" in done.stdout, done.stderr


def test_sigterm_stops_the_server_cleanly(cloud) -> None:
    process, _ = cloud
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
