"""``splitwire-bench load`` as a user runs it: a started server, worker processes, windows until stable."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from splitwire.benchmarks.load_command import Level, _agree, levels_from

BIN = Path(sys.executable).parent
QUICK = [
    "--model", "tiny-bert", "--warmup", "0.5", "--window-seconds", "0.5", "--max-windows", "6",
    "--compute-seconds", "0.5", "--sentences", "20",
]  # fmt: skip


def load(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "load.json"
    done = subprocess.run(
        [BIN / "splitwire-bench", "load", *QUICK, "--json", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "client overhead: a no-op call (health check)" in done.stdout
    return json.loads(out.read_text())


def test_levels_come_from_concurrency_or_rate() -> None:
    assert levels_from(argparse.Namespace(concurrency="1,8", rate=None)) == [Level(1), Level(8)]
    assert levels_from(argparse.Namespace(concurrency="32", rate="50,100")) == [Level(rate=50.0), Level(rate=100.0)]
    for concurrency, rate in (("0", None), ("x", None), ("4", "-1")):
        with pytest.raises(ValueError):
            levels_from(argparse.Namespace(concurrency=concurrency, rate=rate))


def test_windows_agree_only_within_the_stability_band() -> None:
    rule = argparse.Namespace(stable_windows=3, stability=0.1)
    assert _agree([100.0, 105.0, 95.0], rule)
    assert not _agree([100.0, 130.0, 95.0], rule)
    assert not _agree([100.0, 100.0], rule)  # too few windows yet


def test_closed_loop_sweep_writes_json_csv_and_plot(tmp_path: Path) -> None:
    result = load(tmp_path, "--concurrency", "1,4")
    levels = result["levels"]
    assert [level["concurrency"] for level in levels] == [1, 4]
    assert result["load"] == levels[-1] and result["efficiency"] == levels[-1]["efficiency"]
    for level in levels:
        assert level["status_code_distribution"] == {"OK": level["count"]} and level["count"] > 0
        assert level["rps"] > 0 and level["efficiency"] > 0
        assert 3 <= level["windows_measured"] <= 6
        latency = level["latency_ms"]
        assert latency["fastest"] <= latency["p50"] <= latency["p90"] <= latency["p95"] <= latency["p99"]
        assert level["client_cpu_cores"] > 0 and level["server_cpu_cores"] > 0
        assert 0 < level["compute_cpu_cores"] < level["server_cpu_cores"]  # the compute process is part of it
        assert set(level["client_stages_ms"]) == {"front", "encode", "network_and_server"}
    assert result["bits_per_token"] > 16 * 32  # fp16 on the 32-wide tiny model, header included
    assert result["client_overhead"]["latency_ms"]["p50"] > 0
    with open(result["csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["Concurrency"] for row in rows] == ["1", "4"]
    assert float(rows[1]["Inferences/Second"]) == levels[1]["rps"]
    assert int(rows[0]["p99 latency"]) == round(1000 * levels[0]["latency_ms"]["p99"])  # microseconds
    assert Path(result["plot"]).stat().st_size > 0


def test_open_loop_offers_the_rate_whatever_the_server_does(tmp_path: Path) -> None:
    result = load(tmp_path, "--rate", "200", "--processes", "2")
    (level,) = result["levels"]
    assert level["request_rate"] == 200 and level["concurrency"] is None and level["client_processes"] == 2
    assert 100 < level["rps"] < 300  # Poisson arrivals at 200/s, served by a server far faster than that


@pytest.mark.parametrize("with_decoding", [False, True])
def test_compute_times_the_back_half_with_or_without_decoding(tmp_path: Path, with_decoding: bool) -> None:
    out = tmp_path / "compute.json"
    command = [BIN / "splitwire-bench", "compute", "--model", "tiny-bert", "--seconds", "0.3", "--sentences", "20"]
    done = subprocess.run(
        [*command, "--batch-size", "8", "--json", str(out), *(["--with-decoding"] if with_decoding else [])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["with_decoding"] is with_decoding
    assert result["compute"]["rps"] > 0 and result["compute"]["batch_size"] == 8 and result["compute"]["batches"] >= 1
    assert (f"decoding {result['codec']} + blocks" in done.stdout) is with_decoding
