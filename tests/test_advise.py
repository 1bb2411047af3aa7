"""``splitwire-bench advise``: its cost model, and a real run on the tiny model from a real rd file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from splitwire.benchmarks.advise_command import ModelTimes

BIN = Path(sys.executable).parent


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "splitwire-bench", *args], capture_output=True, text=True, timeout=300)


def test_front_and_back_add_up_to_the_whole_model() -> None:
    times = ModelTimes(tokenize=0.5, embed=1.0, blocks=[2.0, 3.0, 4.0], head=0.25)
    assert times.front(0) == 1.5 and times.back(0) == 9.25
    assert times.front(2) == 6.5 and times.back(2) == 4.25
    for split in range(4):
        assert times.front(split) + times.back(split) == pytest.approx(10.75)


@pytest.fixture(scope="module")
def rd_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rd") / "rd_tiny.json"
    done = bench(
        "rd", "--model", "tiny-bert", "--task", "stsb", "--slice", "0:30", "--split", "1,3",
        "--codec", "fp16,int8-zstd", "--json", str(path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return path


def advise(rd_file: Path, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "advise.json"
    done = bench(
        "advise", "--model", "tiny-bert", "--rd", str(rd_file), "--sentences", "3", "--device-cpu", "1",
        "--json", str(out), *extra,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "recommended:" in done.stdout and "| configuration |" in done.stdout
    return json.loads(out.read_text())


def test_advise_ranks_every_candidate_and_picks_the_fastest_within_budget(rd_file: Path, tmp_path: Path) -> None:
    result = advise(rd_file, tmp_path, "--link", "1mbit/100ms")
    rows = {row["configuration"]: row for row in result["rows"]}
    assert set(rows) == {
        "split 1 + fp16", "split 1 + int8-zstd", "split 3 + fp16", "split 3 + int8-zstd",
        "cloud only (token ids)", "device only (whole model)",
    }  # fmt: skip
    for row in rows.values():
        assert row["latency_ms"] == pytest.approx(row["device_ms"] + row["link_ms"] + row["cloud_ms"], abs=2e-3)
    device_only = rows["device only (whole model)"]
    assert device_only["link_ms"] == device_only["cloud_ms"] == 0.0
    # every networked request pays the round trip, and fp16's bytes more than int8-zstd's
    assert all(row["link_ms"] >= 100.0 for name, row in rows.items() if row["codec"])
    assert rows["split 1 + fp16"]["link_ms"] > rows["split 1 + int8-zstd"]["link_ms"]
    within = [row for row in result["rows"] if row["within_budget"]]
    assert result["recommendation"] == min(within, key=lambda row: row["latency_ms"])
    assert result["recommendation"] == result["rows"][0]


def test_advise_for_cloud_compute_picks_the_latest_split_it_can(rd_file: Path, tmp_path: Path) -> None:
    result = advise(rd_file, tmp_path, "--link", "100mbit/10ms", "--minimise", "cloud", "--quality-budget", "0.5")
    best = result["recommendation"]
    assert best["codec"] and best["split"] == 3  # least of the back half, yet still split
    networked = [row for row in result["rows"] if row["codec"] and row["within_budget"]]
    assert best["cloud_ms"] == min(row["cloud_ms"] for row in networked)


def test_advise_refuses_an_rd_file_of_another_model(rd_file: Path, tmp_path: Path) -> None:
    done = bench("advise", "--model", "tiny-llama", "--rd", str(rd_file), "--sentences", "2")
    assert done.returncode == 2
    assert "holds results for tiny-bert, not tiny-llama" in done.stderr
    missing = bench("advise", "--rd", str(tmp_path / "nothing.json"))
    assert missing.returncode == 2 and "run `splitwire-bench rd" in missing.stderr
