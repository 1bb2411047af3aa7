"""``splitwire-bench rd``: every codec and split point on a task, beside the unsplit model, as JSON + PNG."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np
import torch
from splitwire.benchmarks import datasets
from splitwire.benchmarks.bdrate import bd_rate
from splitwire.benchmarks.plots import plot_rate_distortion
from splitwire.benchmarks.rd import (
    Output,
    RateRow,
    codec_overhead_ratio,
    fit_linear_head,
    next_token_loss,
    pair_cosines,
    paired_ratio_interval,
    run_through_codec,
    spearman_x100,
    task_output,
    tokenized,
)
from splitwire.benchmarks.shipping import record_figures
from splitwire.codec.catalog import CodecCatalog, read_manifest
from splitwire.split.cut import Cut
from splitwire.split.models import LoadedModel, ModelFamily, load_model

log = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 1000

QUALITY_NAMES = {
    "stsb": "STS-B Spearman x100",
    "classify": "accuracy %",
    "lm": "perplexity",
}


class Task:
    """Token sequences to send through each codec, what the cloud computes from each, how to score that."""

    name: str
    higher_is_better = True
    sequences: list[torch.Tensor]  # token ids (1, T) each
    output: Output = staticmethod(task_output)
    data: Path
    unit: str  # what the bootstrap resamples: the rows of units()

    def units(self, outputs: torch.Tensor) -> np.ndarray:
        """One row per scored unit (a pair, a sentence, a window): what the score is computed from."""
        raise NotImplementedError

    def score_units(self, units: np.ndarray) -> float:
        raise NotImplementedError

    def score(self, outputs: torch.Tensor) -> float:
        return self.score_units(self.units(outputs))

    def against_unsplit(self, units: np.ndarray, unsplit_units: np.ndarray) -> dict[str, float]:
        """Figures a row adds from comparing its units with the unsplit model's, unit by unit."""
        return {}


class StsbTask(Task):
    name = "stsb"
    unit = "pair"

    def __init__(self, model: LoadedModel, data: Path | None, rows: slice) -> None:
        self.data = data or datasets.STSB_DEV
        self.pairs = datasets.read_stsb(self.data)[rows]
        self.texts = datasets.stsb_sentences(self.pairs)
        self.sequences = tokenized(model, self.texts)

    def units(self, outputs: torch.Tensor) -> np.ndarray:
        """Per pair: the cosine of its embeddings and its gold score."""
        cosines = pair_cosines(dict(zip(self.texts, outputs, strict=True)), self.pairs)
        return np.stack([cosines, np.array([p.score for p in self.pairs])], axis=1)

    def score_units(self, units: np.ndarray) -> float:
        return spearman_x100(units[:, 0], units[:, 1])


class ClassifyTask(Task):
    """A fixed logistic-regression head, trained once on uncompressed (unsplit) embeddings."""

    name = "classify"
    unit = "sentence"

    def __init__(
        self, model: LoadedModel, data: Path | None, train: Path | None, rows: slice, train_limit: int | None
    ) -> None:
        self.data = data or datasets.SST2_DEV
        evaluation = datasets.read_labelled(self.data)
        if train is None and data is None:
            train = datasets.SST2_TRAIN
        if train is not None:
            training = datasets.read_labelled(train)
        else:  # no separate training file: the first half trains the head, the rest is evaluated
            half = len(evaluation) // 2
            training, evaluation = evaluation[:half], evaluation[half:]
        training = training[:train_limit] if train_limit else training
        evaluation = evaluation[rows]
        self.sequences = tokenized(model, [text for text, _ in evaluation])
        self.labels = np.array([label for _, label in evaluation])
        self.head = fit_linear_head(model, training)
        self.train_rows = len(training)

    def units(self, outputs: torch.Tensor) -> np.ndarray:
        """Per sentence: 1 if the head's answer is right, else 0; and the answer (its index in the head's
        classes)."""
        answers = self.head.predict(outputs.numpy())
        index = np.searchsorted(self.head.classes_, answers)
        return np.stack([(answers == self.labels), index], axis=1).astype(np.float64)

    def score_units(self, units: np.ndarray) -> float:
        return float(100.0 * np.mean(units[:, 0]))

    def against_unsplit(self, units: np.ndarray, unsplit_units: np.ndarray) -> dict[str, float]:
        """How many answers the codec changed, whichever way: its damage without the luck of which
        changes happen to land right (accuracy nets them out)."""
        return {"answers_changed": int(np.sum(units[:, 1] != unsplit_units[:, 1]))}


class LmTask(Task):
    """Perplexity of a decoder LM on a WikiText file: its lines joined by newlines, tokenised once, cut
    into non-overlapping windows (each window one payload, each token predicted from its window only)."""

    name = "lm"
    unit = "window"
    higher_is_better = False
    output = staticmethod(next_token_loss)

    def __init__(self, model: LoadedModel, data: Path | None, rows: slice, window: int, max_tokens: int | None) -> None:
        self.data = data or datasets.WIKITEXT2_VALID
        ids = model.tokenizer("\n".join(datasets.read_wikitext(self.data)[rows]))["input_ids"]
        usable = len(ids) if max_tokens is None else min(len(ids), max_tokens)
        if usable < window:
            raise ValueError(f"{self.data} gives {usable} tokens, fewer than one window of {window}")
        self.sequences = [torch.tensor(ids[i : i + window])[None] for i in range(0, usable - window + 1, window)]
        self.window = window

    def units(self, outputs: torch.Tensor) -> np.ndarray:
        """Per window: its summed loss (nats) and the number of tokens it predicts."""
        return outputs.double().numpy()

    def score_units(self, units: np.ndarray) -> float:
        return math.exp(float(units[:, 0].sum() / units[:, 1].sum()))


def _splits(arg: str | None, model: LoadedModel) -> list[int]:
    if arg is None:
        return [model.spec.default_split]
    if arg == "all":
        shipped = {e.split for e in read_manifest() if e.model_fingerprint == model.fingerprint}
        return sorted(shipped | {model.spec.default_split})
    return [int(s) for s in arg.split(",")]


def _bd_rates(rows: list[RateRow]) -> list[dict[str, object]]:
    """BD-rate of each codec family (per split) against fp16 and against the uniform baseline."""
    out = []
    families: dict[tuple[str, int], list[RateRow]] = {}
    for row in rows:
        families.setdefault((row.kind, row.split), []).append(row)
    for (kind, split), members in sorted(families.items()):
        entry: dict[str, object] = {"kind": kind, "split": split}
        for anchor_kind in ("fp16", "uniform"):
            anchor = families.get((anchor_kind, split), [])
            value = bd_rate(
                [(r.bits_per_token, r.quality) for r in anchor],
                [(r.bits_per_token, r.quality) for r in members],
                higher_is_better=members[0].higher_is_better,
            )
            entry[f"vs_{anchor_kind}_percent"] = value
            if value is None:
                entry[f"vs_{anchor_kind}_note"] = (
                    "no anchor at this split" if not anchor else "the curves cover no common quality range"
                )
        out.append(entry)
    return out


def run(args: argparse.Namespace) -> dict[str, object]:
    model = load_model(args.model)
    rows_slice = args.slice or slice(None)
    wanted_family = ModelFamily.DECODER if args.task == "lm" else ModelFamily.ENCODER
    if model.family is not wanted_family:
        article = "an" if wanted_family is ModelFamily.ENCODER else "a"
        raise ValueError(f"--task {args.task} needs {article} {wanted_family.value} model; {model.name} is not one")
    task: Task
    if args.task == "lm":
        task = LmTask(model, args.data, rows_slice, args.window, args.max_tokens)
    elif args.task == "stsb":
        task = StsbTask(model, args.data, rows_slice)
    else:
        task = ClassifyTask(model, args.data, args.train, rows_slice, args.train_limit)
    catalog = CodecCatalog.for_model(model.fingerprint, model.hidden_size)
    wanted = args.codec.split(",") if args.codec else None
    splits = _splits(args.split, model)
    for name in wanted or []:
        codec = catalog.get(name)
        if not any(codec.valid_at(split) for split in splits):
            raise ValueError(f"codec {name} is valid at none of splits {splits} (trained for {list(codec.splits)})")
    everything = Cut(model.num_blocks, model.num_blocks)
    unsplit_units = task.units(run_through_codec(model, everything, None, task.sequences, task.output).outputs)
    unsplit = task.score_units(unsplit_units)
    print(f"unsplit {model.name}: {QUALITY_NAMES[task.name]} = {unsplit:.2f} on {len(task.sequences)} inputs")
    rows: list[RateRow] = []
    for split in splits:
        cut = Cut(model.num_blocks, split)
        # A named codec runs at each asked split it is valid at: a learned codec belongs to its split.
        names = [n for n in wanted if catalog.get(n).valid_at(split)] if wanted else catalog.names(split)
        for name in names:
            codec = catalog.get(name)
            coded = run_through_codec(model, cut, codec, task.sequences, task.output)
            units = task.units(coded.outputs)
            row = RateRow(
                codec=name,
                kind=codec.kind.label,
                split=split,
                task=task.name,
                quality=task.score_units(units),
                unsplit_quality=unsplit,
                higher_is_better=task.higher_is_better,
                **coded.row_fields(),
            )
            row.extra["codec_time_over_front_time_32_tokens"] = codec_overhead_ratio(model, cut, codec)
            row.extra.update(task.against_unsplit(units, unsplit_units))
            # relative_quality is unsplit / quality when lower is better: the ratio's operands swap with it.
            first, second = (units, unsplit_units) if task.higher_is_better else (unsplit_units, units)
            low, high = paired_ratio_interval(task.score_units, first, second, resamples=BOOTSTRAP_RESAMPLES)
            if math.isfinite(low):  # NaN only on a few rows with tied gold scores: no interval then
                row.extra["relative_quality_ci95_low"], row.extra["relative_quality_ci95_high"] = low, high
            rows.append(row)
            print(
                f"split {split} {name:>24}: {row.bits_per_token:9.2f} bits/token "
                f"(estimated {row.estimated_bits_per_token:8.2f}), quality {row.quality:.2f} "
                f"({100 * row.relative_quality:.2f}% of unsplit, 95% interval {100 * low:.2f}-{100 * high:.2f}%)",
                flush=True,
            )
    bd = _bd_rates(rows)
    plot = args.plot or args.json.with_suffix(".png")
    plot_rate_distortion(rows, plot, plot_title(model.name, task.name, task.data), QUALITY_NAMES[task.name])
    if args.record_manifest:
        shipped = {e.name for e in read_manifest()}
        for row in rows:
            if row.codec in shipped:
                reference_task = task.name in ("stsb", "lm") and task.data.name in ("sts-dev.csv", "wiki.valid.tokens")
                expected = row.bits_per_token if reference_task else None
                record_figures(row.codec, _manifest_figures(row, task), expected_bits_per_token=expected)
    return {
        "model": model.name,
        "model_fingerprint": model.fingerprint,
        "task": task.name,
        "quality_name": QUALITY_NAMES[task.name],
        "data": str(task.data),
        "rows_evaluated": len(task.sequences),
        "unsplit_quality": unsplit,
        "relative_quality_interval": {
            "method": f"paired percentile bootstrap over {task.unit}s, codec and unsplit resampled together",
            "resamples": BOOTSTRAP_RESAMPLES,
            "level": 0.95,
        },
        "rows": [row.to_json(fp16_bits_per_token=16.0 * model.hidden_size) for row in rows],
        "bd_rate": bd,
        "plot": str(plot),
    }


def plot_title(model: str, task: str, data: Path) -> str:
    return f"{model}, {QUALITY_NAMES[task]} on {data.name}"


def _manifest_figures(row: RateRow, task: Task) -> dict[str, object]:
    prefix = f"{task.name}_{task.data.stem}"
    return {
        f"{prefix}_quality": round(row.quality, 3),
        f"{prefix}_unsplit_quality": round(row.unsplit_quality, 3),
        f"{prefix}_bits_per_token": round(row.bits_per_token, 3),
    }
