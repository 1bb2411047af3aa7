"""The serving benchmarks' workload: STS-B dev sentences, run through the front half and a codec once,
off the clock, so timed loops only send or compute.

::

    sts-dev.csv -> unique sentences -> tokenize -> blocks [0, k) -> codec.encode_sequence -> payloads
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from splitwire.benchmarks import datasets
from splitwire.codec.base import Codec
from splitwire.edge.agent import codec_input
from splitwire.split.cut import Cut, SplitModel
from splitwire.split.models import LoadedModel

log = logging.getLogger(__name__)


def sentences(path: Path | None, limit: int) -> list[str]:
    """The first ``limit`` unique sentences of an STS-B csv (default: the bundled dev split)."""
    pairs = datasets.read_stsb(path or datasets.STSB_DEV)
    texts = datasets.stsb_sentences(pairs)[:limit]
    if not texts:
        raise ValueError(f"no sentences in {path or datasets.STSB_DEV}")
    return texts


@dataclass(frozen=True)
class EncodedWorkload:
    """Payloads built as the edge builds them, with what building them cost."""

    payloads: list[bytes]
    tokens: list[int]  # input tokens of each payload
    front_ms: list[float]  # tokenise + front half, per payload
    encode_ms: list[float]

    @property
    def bits_per_token(self) -> float:
        return 8.0 * sum(len(p) for p in self.payloads) / max(sum(self.tokens), 1)


def encode(model: LoadedModel, cut: Cut, codec: Codec, texts: list[str]) -> EncodedWorkload:
    """One payload per text, exactly as the edge agent builds it (front half, then the codec), timed."""
    split_model = SplitModel(model)
    out = EncodedWorkload([], [], [], [])
    for text in texts:
        started = time.perf_counter()
        input_ids, token_mask = model.tokenize([text])
        hidden = codec_input(split_model, cut, codec, input_ids, token_mask)[0]
        fronted = time.perf_counter()
        out.payloads.append(codec.encode_sequence(hidden))
        out.front_ms.append(1000 * (fronted - started))
        out.encode_ms.append(1000 * (time.perf_counter() - fronted))
        out.tokens.append(int(token_mask.sum()))
    log.info("encoded %d texts with %s at split %d", len(texts), codec.name, cut.split)
    return out
