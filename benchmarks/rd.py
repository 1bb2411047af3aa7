"""Rate-distortion measurement: every sequence goes through the real payload path.

For each input: front half -> ``codec.encode_payload`` -> bytes counted -> ``codec.decode_payload`` ->
back half -> task output. Quality is computed from those outputs, next to the unsplit model's quality
on the same data in the same run.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from splitwire.benchmarks.datasets import SentencePair
from splitwire.codec.base import Codec
from splitwire.codec.container import bits_per_token
from splitwire.split.cut import Cut, SplitModel, positions_from_mask
from splitwire.split.models import LoadedModel


@dataclass
class RateRow:
    """One codec at one split point on one task: what the README's tables and plots are made of."""

    codec: str
    kind: str
    split: int
    task: str
    bits_per_token: float  # real payload bytes x 8 / input tokens, headers included
    estimated_bits_per_token: float  # -log2 likelihood of the codec body / input tokens
    quality: float
    unsplit_quality: float
    higher_is_better: bool
    encode_ms_per_token: float
    decode_ms_per_token: float
    payload_bytes_mean: float
    overhead_bytes_mean: float  # real payload bytes - estimated body bytes, per request
    sequences: int
    tokens: int
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def relative_quality(self) -> float:
        return self.quality / self.unsplit_quality if self.higher_is_better else self.unsplit_quality / self.quality

    def to_json(self, fp16_bits_per_token: float | None = None) -> dict[str, object]:
        out = asdict(self)
        out["relative_quality"] = self.relative_quality
        if fp16_bits_per_token:
            out["fewer_bits_than_fp16"] = fp16_bits_per_token / self.bits_per_token
        return out


@dataclass
class Coded:
    """Outputs of a set of sequences sent through a codec, and what it cost."""

    outputs: torch.Tensor  # (N, ...) head outputs, in input order
    payload_bytes: int
    estimated_bits: float
    tokens: int
    encode_s: float
    decode_s: float
    sequences: int

    def row_fields(self) -> dict[str, float]:
        return {
            "bits_per_token": bits_per_token(self.payload_bytes, self.tokens),
            "estimated_bits_per_token": self.estimated_bits / self.tokens,
            "encode_ms_per_token": 1000 * self.encode_s / self.tokens,
            "decode_ms_per_token": 1000 * self.decode_s / self.tokens,
            "payload_bytes_mean": self.payload_bytes / self.sequences,
            "overhead_bytes_mean": (self.payload_bytes - self.estimated_bits / 8) / self.sequences,
            "sequences": self.sequences,
            "tokens": self.tokens,
        }


# What the cloud half computes from one sequence: (split model, cut, input ids (1, T), hidden state at the
# split (1, T', D), which of them are real (1, T'), their original positions (1, T')) -> one output row.
Output = Callable[[SplitModel, Cut, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def task_output(
    split_model: SplitModel, cut: Cut, ids: torch.Tensor, hidden: torch.Tensor, kept: torch.Tensor, positions
) -> torch.Tensor:
    """The model's own answer: a sentence embedding (encoders), next-token logits (decoders)."""
    return split_model.run_back(cut, hidden, kept, positions)[0]


def next_token_loss(
    split_model: SplitModel, cut: Cut, ids: torch.Tensor, hidden: torch.Tensor, kept: torch.Tensor, positions
) -> torch.Tensor:
    """``[summed negative log-likelihood (nats) of tokens 1..T-1, their count]``: perplexity's ingredients."""
    if hidden.shape[1] != ids.shape[1]:
        raise ValueError("next-token loss needs every token; this codec dropped some")
    logits = split_model.token_logits(cut, hidden, kept, positions)[0]
    nll = F.cross_entropy(logits[:-1].float(), ids[0, 1:], reduction="sum")
    return torch.stack([nll, torch.tensor(float(ids.shape[1] - 1))])


def run_through_codec(
    model: LoadedModel,
    cut: Cut,
    codec: Codec | None,
    sequences: Sequence[torch.Tensor],
    output: Output = task_output,
) -> Coded:
    """Each sequence of token ids ``(1, T)`` alone through front -> payload -> back; ``codec=None`` runs
    the unsplit model (pass the cut after the last block)."""
    split_model = SplitModel(model)
    front = split_model.with_front_adapter(None if codec is None else codec.front_adapter)
    outputs = []
    payload_bytes = tokens = 0
    estimated = encode_s = decode_s = 0.0
    with torch.inference_mode():
        for ids in sequences:
            mask = torch.ones_like(ids, dtype=torch.bool)
            tokens += ids.shape[1]
            hidden = front.run_front(cut, ids, mask)
            if codec is None:
                outputs.append(output(split_model, cut, ids, hidden, mask, positions_from_mask(mask)))
                continue
            t0 = time.perf_counter()
            payload = codec.encode_sequence(hidden[0])
            t1 = time.perf_counter()
            header, decoded = codec.decode_payload(payload)
            t2 = time.perf_counter()
            encode_s += t1 - t0
            decode_s += t2 - t1
            payload_bytes += len(payload)
            estimated += codec.estimate_bits(decoded_input(hidden[0], header))
            positions = torch.from_numpy(np.flatnonzero(header.kept_mask()))[None]
            kept = torch.ones(1, decoded.shape[0], dtype=torch.bool)
            outputs.append(output(split_model, cut, ids, decoded[None], kept, positions))
    return Coded(torch.stack(outputs), payload_bytes, estimated, tokens, encode_s, decode_s, len(sequences))


def tokenized(model: LoadedModel, texts: Sequence[str]) -> list[torch.Tensor]:
    """Each text's token ids ``(1, T)``, as the edge would tokenise it alone."""
    return [model.tokenize([text])[0] for text in texts]


def decoded_input(hidden: torch.Tensor, header) -> torch.Tensor:
    """The rows of ``hidden`` ``(T, D)`` the payload carries (the kept tokens)."""
    return hidden if header.token_mask is None else hidden[torch.from_numpy(header.token_mask)]


def fit_linear_head(model: LoadedModel, rows: Sequence[tuple[str, str]]):
    """A logistic-regression head on the unsplit embeddings of ``(text, label)`` rows: the classifier the
    classify task scores codecs with, and the head a codec can be trained to spare."""
    from sklearn.linear_model import LogisticRegression

    head = LogisticRegression(max_iter=2000)
    embeddings = SplitModel(model).run_unsplit_texts([text for text, _ in rows]).numpy()
    head.fit(embeddings, np.array([label for _, label in rows]))
    return head


def spearman_x100(predicted: np.ndarray, gold: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(100.0 * spearmanr(predicted, gold).statistic)


def pair_cosines(embeddings: dict[str, torch.Tensor], pairs: Sequence[SentencePair]) -> np.ndarray:
    """Cosine similarity of each pair's (unit-length) sentence embeddings."""
    return np.array([float(torch.dot(embeddings[p.first], embeddings[p.second])) for p in pairs])


def stsb_quality(embeddings: dict[str, torch.Tensor], pairs: Sequence[SentencePair]) -> float:
    """Spearman x 100 between cosine similarity and the gold scores."""
    return spearman_x100(pair_cosines(embeddings, pairs), np.array([p.score for p in pairs]))


def paired_ratio_interval(
    score: Callable[[np.ndarray], float],
    coded: np.ndarray,
    reference: np.ndarray,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``score(coded) / score(reference)``.

    ``coded`` and ``reference`` hold one row per unit (a pair, a sentence, a window) in the same order;
    each resample draws the same rows from both, so what the two runs share (which inputs are hard)
    cancels and the interval reflects how the codec's effect varies across inputs. Seeded: the same
    rows give the same interval. A resample whose reference scores zero or not at all (a Spearman over
    tied gold scores, on a handful of rows) is left out; with none left, the interval is NaN."""
    if len(coded) != len(reference) or not len(coded):
        raise ValueError(f"paired rows needed: {len(coded)} coded against {len(reference)} reference")
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(resamples):
        rows = rng.integers(0, len(coded), len(coded))
        denominator = score(reference[rows])
        ratio = score(coded[rows]) / denominator if math.isfinite(denominator) and denominator else math.nan
        if math.isfinite(ratio):
            ratios.append(ratio)
    if not ratios:
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return float(low), float(high)


def codec_overhead_ratio(model: LoadedModel, cut: Cut, codec: Codec, tokens: int = 32, repeats: int = 50) -> float:
    """Median (encode + decode) time of a ``tokens``-token input over the median front-half time.

    Both are timed in this call, interleaved, after a warm-up, so machine noise hits them alike.
    """
    split_model = SplitModel(model).with_front_adapter(codec.front_adapter)
    ids = torch.full((1, tokens), 1000, dtype=torch.long)
    ids[0, 0], ids[0, -1] = 101, 102
    mask = torch.ones(1, tokens, dtype=torch.bool)
    front_times, codec_times = [], []
    with torch.inference_mode():
        for i in range(repeats + 5):
            t0 = time.perf_counter()
            hidden = split_model.run_front(cut, ids, mask)[0]
            t1 = time.perf_counter()
            codec.decode_payload(codec.encode_sequence(hidden))
            t2 = time.perf_counter()
            if i >= 5:
                front_times.append(t1 - t0)
                codec_times.append(t2 - t1)
    return statistics.median(codec_times) / statistics.median(front_times)
