"""Readers for the evaluation data, each in its original public format.

* STS-B csv (``sts-*.csv``): tab-separated, no header, no quoting; columns genre, file, year, id,
  score (0-5), sentence 1, sentence 2; some rows carry extra trailing columns.
* Labelled tsv (GLUE style): ``text<TAB>label``, with or without a header, labels may be strings.
* WikiText tokens (``wiki.*.tokens``): one paragraph per line, word-level tokenised.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

# Where the repository keeps its copy of the data (see data/README.md for sources and terms).
DATA_DIR = Path(__file__).resolve().parents[1] / "data"
STSB_TRAIN = DATA_DIR / "stsb" / "sts-train.csv"
STSB_DEV = DATA_DIR / "stsb" / "sts-dev.csv"
SST2_TRAIN = DATA_DIR / "sst2" / "train.tsv"
SST2_DEV = DATA_DIR / "sst2" / "dev.tsv"
WIKITEXT2_VALID = DATA_DIR / "wikitext2" / "wiki.valid.tokens"


class DataFormatError(ValueError):
    """A data file is not in the format its reader expects."""


@dataclass(frozen=True)
class SentencePair:
    first: str
    second: str
    score: float


def require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass --data with a file in its original format")
    return path


def read_stsb(path: Path) -> list[SentencePair]:
    """STS-B pairs from an ``sts-*.csv`` file."""
    pairs = []
    for number, line in enumerate(require(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 7:
            raise DataFormatError(f"{path}:{number}: expected at least 7 tab-separated fields, got {len(fields)}")
        try:
            score = float(fields[4])
        except ValueError:
            raise DataFormatError(f"{path}:{number}: score {fields[4]!r} is not a number") from None
        pairs.append(SentencePair(fields[5], fields[6], score))
    if not pairs:
        raise DataFormatError(f"{path}: no sentence pairs")
    return pairs


def read_labelled(path: Path) -> list[tuple[str, str]]:
    """``(text, label)`` rows of a ``text<TAB>label`` file; a first row ``sentence<TAB>label`` is a header."""
    rows = []
    lines = require(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        text, sep, label = line.rstrip("\n").rpartition("\t")
        if not sep:
            raise DataFormatError(f"{path}:{number}: expected text<TAB>label")
        if number == 1 and text.strip().lower() in {"sentence", "text"} and label.strip().lower() == "label":
            continue
        rows.append((text.strip(), label.strip()))
    if not rows:
        raise DataFormatError(f"{path}: no labelled rows")
    return rows


def read_wikitext(path: Path) -> list[str]:
    """Non-empty lines of a WikiText token file, headings included, stripped."""
    return [line.strip() for line in require(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def row_slice(text: str) -> slice:
    """``START:STOP`` (either may be empty, as in Python) -> the slice of a data file's rows it names."""
    start, colon, stop = text.partition(":")
    if colon:
        with contextlib.suppress(ValueError):  # not integers: refused below, in the same words
            return slice(int(start) if start else None, int(stop) if stop else None)
    raise ValueError(f"expected rows as START:STOP (either may be empty), got {text!r}")


def stsb_sentences(pairs: list[SentencePair]) -> list[str]:
    """Unique sentences of ``pairs`` in first-seen order."""
    return list(dict.fromkeys(s for pair in pairs for s in (pair.first, pair.second)))
