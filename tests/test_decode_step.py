"""``splitwire-bench decode-step``: a real server process on loopback, tiny-llama, split and unsplit timed."""

from __future__ import annotations

import json
from pathlib import Path

from splitwire.benchmarks.cli import main as bench_main


def test_decode_step_times_both_sides_and_checks_the_tokens(tmp_path: Path) -> None:
    out = tmp_path / "decode_step.json"
    code = bench_main(
        ["--threads", "1", "decode-step", "--model", "tiny-llama", "--split", "1", "--codec", "fp32,int8-zstd",
         "--steps", "6", "--rounds", "2", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["model"] == "tiny-llama" and result["steps"] == 6 and result["rounds"] == 2
    baseline = result["unsplit_step_ms"]
    assert baseline["baseline_median"] == min(baseline["splitwire"]["median"], baseline["transformers"]["median"]) > 0
    lossless, lossy = result["rows"]
    assert (lossless["codec"], lossless["split"]) == ("fp32", 1)
    assert lossless["same_tokens_as_unsplit"] is True  # fp32 through the split is greedy-identical
    assert lossless["bits_per_token"] > lossy["bits_per_token"] > 0
    for row in result["rows"]:
        assert len(row["step_ms_all"]) == 12  # 6 steps in each of 2 rounds
        assert row["ratio"] == round(row["step_ms"]["median"] / baseline["baseline_median"], 4)
