"""The back half on a batch: decode each payload, pad the sequences of different lengths into one
tensor with a mask, run blocks [split, L) and the head, and split the output back into one answer per
sequence.

::

    coded jobs [codec, header, body] --decode_hidden--> jobs [(T_i, D) hidden, (T_i,) positions]
        --pad to max T--> (B, T, D) + mask (B, T) + positions (B, T)
        --SplitModel.run_back--> (B, D) embeddings | (B, V) logits --> [Answer] * B

Payloads are decoded here, where the back half runs (the compute process, or the compute thread),
not on the server's event loop: the loop's core is the one that serves gRPC, and a decoded sequence
is a few hundred times the size of its payload to hand over. A payload that does not decode fails
its own request only (its slot in the answers holds the error); the rest of the batch goes on.

Padding is invisible to the answers: padded keys are masked out of attention and out of pooling, so a
sequence gets the same answer alone or in any batch (tests/test_engine.py checks it).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from splitwire.codec.base import Codec
from splitwire.codec.catalog import CodecCatalog
from splitwire.codec.container import Header
from splitwire.codec.errors import BitstreamError
from splitwire.split.cut import Cut, SplitModel
from splitwire.split.models import LoadedModel, ModelFamily


@dataclass(frozen=True)
class BackJob:
    """One decoded sequence waiting for the back half."""

    hidden: torch.Tensor  # (T_kept, D) float32
    positions: torch.Tensor  # (T_kept,) long: original positions of the kept tokens


@dataclass(frozen=True)
class CodedJob:
    """One sequence still in its codec's bitstream, its header parsed and checked by the server."""

    codec: str
    header: Header
    body: bytes


@dataclass(frozen=True)
class Answer:
    """What the head answered for one sequence: an embedding or a next token."""

    embedding: np.ndarray | None = None  # (D,) float32, encoders
    token_id: int | None = None  # decoders
    token_logprob: float | None = None
    decode_s: float = 0.0  # CPU seconds spent decoding its payload


def kept_positions(header: Header) -> torch.Tensor:
    """``(T_kept,)`` long: the input positions of the tokens a payload holds."""
    return torch.from_numpy(np.flatnonzero(header.kept_mask()))


def decode_hidden(codec: Codec, header: Header, body: bytes | memoryview, split_model: SplitModel) -> torch.Tensor:
    """A payload's body -> the input of the back half's first block for its kept tokens ``(T_kept, D)``;
    BitstreamError when malformed. Token ids (split 0, nothing run on the edge) are embedded here."""
    hidden = codec.decode_body(header, body)
    if not codec.codes_token_ids:
        return hidden
    ids = hidden.reshape(1, -1).long()
    with torch.inference_mode():
        return split_model.embed(ids, torch.ones_like(ids, dtype=torch.bool))[0]


class BackHalf:
    """Runs batches of :class:`CodedJob` (or decoded :class:`BackJob`) through one model's back half, on
    the calling thread. ``catalog``: the codecs coded jobs may name."""

    def __init__(self, model: LoadedModel, catalog: CodecCatalog | None = None) -> None:
        self.model = model
        self.catalog = catalog
        self._split_model = SplitModel(model)

    def run_coded(self, cut: Cut, jobs: Sequence[CodedJob]) -> list[Answer | Exception]:
        """Decode each job and run the ones that decoded as one batch; in order, an answer per job or the
        exception its decoding raised (BitstreamError for a malformed payload)."""
        assert self.catalog is not None, "coded jobs need the codec catalog"
        results: list[Answer | Exception] = []
        decoded: list[tuple[int, BackJob, float]] = []
        for index, job in enumerate(jobs):
            started = time.thread_time()
            try:
                hidden = decode_hidden(self.catalog.get(job.codec), job.header, job.body, self._split_model)
            except BitstreamError as exc:
                results.append(exc)
                continue
            except Exception as exc:  # a decoder bug must not fail the other requests in the batch
                results.append(RuntimeError(f"decoding with {job.codec} failed: {type(exc).__name__}: {exc}"))
                continue
            decoded.append((index, BackJob(hidden, kept_positions(job.header)), time.thread_time() - started))
            results.append(Answer())  # replaced below
        answers = self.run(cut, [job for _, job, _ in decoded])
        for (index, _, seconds), answer in zip(decoded, answers, strict=True):
            results[index] = dataclasses.replace(answer, decode_s=seconds)
        return results

    def run(self, cut: Cut, jobs: Sequence[BackJob]) -> list[Answer]:
        """One answer per job, in order."""
        if not jobs:
            return []
        longest = max(job.hidden.shape[0] for job in jobs)
        hidden = torch.zeros(len(jobs), longest, self.model.hidden_size)
        positions = torch.zeros(len(jobs), longest, dtype=torch.long)
        mask = torch.zeros(len(jobs), longest, dtype=torch.bool)
        for row, job in enumerate(jobs):
            n = job.hidden.shape[0]
            hidden[row, :n] = job.hidden
            positions[row, :n] = job.positions
            mask[row, :n] = True
        with torch.inference_mode():
            out = self._split_model.run_back(cut, hidden, mask, positions)
            if self.model.family is ModelFamily.ENCODER:
                return [Answer(embedding=row.numpy().copy()) for row in out]
            logprobs = torch.log_softmax(out.float(), dim=-1)
            best = logprobs.max(dim=-1)
            return [
                Answer(token_id=int(i), token_logprob=float(lp))
                for i, lp in zip(best.indices, best.values, strict=True)
            ]

    def warm_up(self, cut: Cut) -> None:
        """One small batch, so the first request does not pay for lazy initialisation."""
        self.run(cut, [BackJob(torch.zeros(4, self.model.hidden_size), torch.arange(4))])

    def close(self) -> None:
        """Nothing to release in-process; here for symmetry with :class:`ComputeProcess`."""
