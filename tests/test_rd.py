"""The rate-distortion benchmark's language-model task: perplexity through the real payload path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from splitwire.benchmarks.cli import main as bench_main
from splitwire.benchmarks.rd import next_token_loss, paired_ratio_interval, run_through_codec
from splitwire.benchmarks.rd_command import ClassifyTask, LmTask
from splitwire.codec.raw import Fp32Codec
from splitwire.split.cut import Cut, SplitModel
from splitwire.split.models import LoadedModel

LINES = [
    " = Valkyrie = ",
    " The ship was laid down in 1911 and launched a year later , after a long delay at the yard . ",
    " She served in the Channel until 1916 , when she was sent to the Mediterranean . ",
    " = = Design = = ",
    " Her four turbines drove two shafts ; the boilers burned coal and , later , oil . ",
] * 6


@pytest.fixture()
def wikitext(tmp_path: Path) -> Path:
    path = tmp_path / "wiki.valid.tokens"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return path


def test_perplexity_of_the_unsplit_model_matches_the_model_itself(tiny_llama: LoadedModel, wikitext: Path) -> None:
    task = LmTask(tiny_llama, wikitext, slice(None), window=24, max_tokens=None)
    assert len(task.sequences) >= 3 and all(s.shape == (1, 24) for s in task.sequences)
    everything = Cut(tiny_llama.num_blocks, tiny_llama.num_blocks)
    ours = task.score(run_through_codec(tiny_llama, everything, None, task.sequences, task.output).outputs)
    with torch.inference_mode():
        losses = [
            F.cross_entropy(tiny_llama.hf_model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="sum")
            for ids in task.sequences
        ]
    reference = math.exp(float(sum(losses)) / (23 * len(task.sequences)))
    assert ours == pytest.approx(reference, rel=1e-5)


def test_a_lossless_codec_through_the_split_keeps_perplexity(tiny_llama: LoadedModel, wikitext: Path) -> None:
    task = LmTask(tiny_llama, wikitext, slice(None), window=16, max_tokens=64)
    assert len(task.sequences) == 4
    everything = Cut(tiny_llama.num_blocks, tiny_llama.num_blocks)
    unsplit = run_through_codec(tiny_llama, everything, None, task.sequences, next_token_loss)
    coded = run_through_codec(tiny_llama, Cut(4, 2), Fp32Codec("fp32", 32), task.sequences, next_token_loss)
    assert task.score(coded.outputs) == pytest.approx(task.score(unsplit.outputs), rel=1e-5)
    assert coded.tokens == 64 and coded.payload_bytes > 64 * 32 * 4


def test_rd_command_reports_perplexity_lower_is_better(tiny_llama: LoadedModel, wikitext: Path, tmp_path: Path) -> None:
    out = tmp_path / "rd_lm.json"
    argv = ["rd", "--model", "tiny-llama", "--task", "lm", "--data", str(wikitext), "--split", "1,2"]
    argv += ["--codec", "fp32,fp16", "--window", "16", "--max-tokens", "64", "--json", str(out)]
    assert bench_main(argv) == 0
    result = json.loads(out.read_text())
    assert result["quality_name"] == "perplexity" and result["rows_evaluated"] == 4
    rows = {(row["split"], row["codec"]): row for row in result["rows"]}
    assert set(rows) == {(1, "fp32"), (1, "fp16"), (2, "fp32"), (2, "fp16")}
    for row in rows.values():
        assert row["higher_is_better"] is False
        assert row["unsplit_quality"] == result["unsplit_quality"]
    assert rows[(2, "fp32")]["relative_quality"] == pytest.approx(1.0, rel=1e-5)
    for row in rows.values():  # the interval brackets the ratio it is about
        extra = row["extra"]
        assert extra["relative_quality_ci95_low"] <= row["relative_quality"] <= extra["relative_quality_ci95_high"]
    lossless = rows[(2, "fp32")]["extra"]
    assert lossless["relative_quality_ci95_low"] == pytest.approx(1.0, rel=1e-5)
    assert lossless["relative_quality_ci95_high"] == pytest.approx(1.0, rel=1e-5)
    assert result["relative_quality_interval"]["resamples"] == 1000
    assert "window" in result["relative_quality_interval"]["method"]
    assert 16 * 32 <= rows[(2, "fp16")]["bits_per_token"] < 16 * 32 + 8
    assert Path(result["plot"]).exists()
    Path(result["plot"]).unlink()
    assert bench_main(["report", "--plot", str(out)]) == 0
    assert Path(result["plot"]).exists()


def test_rd_refuses_a_task_the_model_cannot_do(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["rd", "--model", "tiny-bert", "--task", "lm", "--json", str(tmp_path / "x.json")]
    assert bench_main(argv) == 2
    assert "needs a decoder model" in capsys.readouterr().err


def test_named_codecs_run_only_at_the_splits_they_belong_to(minilm: LoadedModel, tmp_path: Path) -> None:
    out = tmp_path / "rd_stsb.json"
    argv = ["rd", "--task", "stsb", "--slice", "0:6", "--split", "1,5", "--json", str(out)]
    assert bench_main([*argv, "--codec", "fp16,hyperprior-s1-l500,hyperprior-s5-l500"]) == 0
    rows = {(row["split"], row["codec"]) for row in json.loads(out.read_text())["rows"]}
    assert rows == {(1, "fp16"), (1, "hyperprior-s1-l500"), (5, "fp16"), (5, "hyperprior-s5-l500")}


def test_rd_refuses_a_codec_valid_at_none_of_the_splits(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["rd", "--task", "stsb", "--split", "3", "--codec", "hyperprior-s5-l500", "--json", str(tmp_path / "x.json")]
    assert bench_main(argv) == 2
    assert "hyperprior-s5-l500 is valid at none of splits [3]" in capsys.readouterr().err


def accuracy(rows: np.ndarray) -> float:
    return float(100.0 * rows.mean())


def test_paired_interval_of_identical_runs_is_exactly_one() -> None:
    rows = np.random.default_rng(1).integers(0, 2, 200).astype(float)
    assert paired_ratio_interval(accuracy, rows, rows.copy()) == (1.0, 1.0)


def test_paired_interval_matches_the_binomial_spread_and_is_seeded() -> None:
    reference = np.ones(400)
    coded = np.ones(400)
    coded[::10] = 0.0  # 40 of 400 lost: a ratio of 0.9, standard error sqrt(0.9 * 0.1 / 400) = 0.015
    low, high = paired_ratio_interval(accuracy, coded, reference)
    assert low < 0.9 < high
    assert low == pytest.approx(0.9 - 1.96 * 0.015, abs=0.01) and high == pytest.approx(0.9 + 1.96 * 0.015, abs=0.01)
    assert paired_ratio_interval(accuracy, coded, reference) == (low, high)
    assert paired_ratio_interval(accuracy, coded, reference, seed=1) != (low, high)


def test_paired_interval_needs_rows_in_pairs() -> None:
    with pytest.raises(ValueError, match="paired rows"):
        paired_ratio_interval(accuracy, np.ones(5), np.ones(4))


def test_classify_without_a_training_file_trains_the_head_on_the_first_half(
    tiny_bert: LoadedModel, tmp_path: Path
) -> None:
    words = ["good", "bad", "fine", "awful", "great", "poor"]
    rows = [(f"a {words[i % 6]} film number {i}", "positive" if i % 2 == 0 else "negative") for i in range(40)]
    data = tmp_path / "labelled.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows))
    task = ClassifyTask(tiny_bert, data, None, slice(None), None)
    assert task.train_rows == 20 and len(task.sequences) == 20
    assert list(task.labels) == [label for _, label in rows[20:]]
    outputs = SplitModel(tiny_bert).run_unsplit_texts([text for text, _ in rows[20:]])
    units = task.units(outputs)
    assert set(units[:, 0]) <= {0.0, 1.0}
    assert task.score(outputs) == pytest.approx(100.0 * task.head.score(outputs.numpy(), task.labels))
    assert task.against_unsplit(units, units) == {"answers_changed": 0}
    # Another output for the first three sentences: each of them now answers the other class.
    flipped = units.copy()
    flipped[:3, 1] = 1 - flipped[:3, 1]
    assert task.against_unsplit(flipped, units) == {"answers_changed": 3}
    answers = task.head.predict(outputs.numpy())
    assert list(task.head.classes_[units[:, 1].astype(int)]) == list(answers)


def test_report_shows_answers_changed_for_classify_results_only() -> None:
    from splitwire.benchmarks.report import rd_table

    def payload(extra: dict[str, object]) -> dict[str, object]:
        interval = {"relative_quality_ci95_low": 0.97, "relative_quality_ci95_high": 1.01}
        row = {
            "split": 5,
            "codec": "c",
            "bits_per_token": 30.0,
            "estimated_bits_per_token": 29.0,
            "quality": 80.0,
            "relative_quality": 0.99,
            "extra": interval | extra,
        }
        return {
            "quality_name": "q",
            "task": "t",
            "data": "d",
            "rows_evaluated": 9,
            "unsplit_quality": 81.0,
            "rows": [row],
        }

    classify = rd_table(payload({"answers_changed": 71})).splitlines()
    assert "answers changed" in classify[2] and classify[4].count("|") == classify[2].count("|")
    assert "| 71 |" in classify[4]
    other = rd_table(payload({})).splitlines()
    assert "answers changed" not in other[2] and other[4].count("|") == other[2].count("|") == other[3].count("|")
