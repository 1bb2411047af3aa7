"""The back half on a batch: decode each payload, pad the sequences of different lengths into one
tensor with a mask, run blocks [split, L) and the head, and split the output back into one answer per
sequence.

::

    coded jobs [codec, header, body] --decode_bodies, per codec--> jobs [(T_i, D) hidden, (T_i,) positions]
        --pad to max T--> (B, T, D) + mask (B, T) + positions (B, T)
        --SplitModel.run_back--> (B, D) embeddings | (B, V) logits --> [Answer] * B

Payloads are decoded here, where the back half runs (the compute process, or the compute thread),
not on the server's event loop: the loop's core is the one that serves gRPC, and a decoded sequence
is a few hundred times the size of its payload to hand over. The payloads of one codec decode
together (a learned codec runs its transforms once over all their tokens rather than once per
payload); a payload that does not decode fails its own request only (its slot
in the answers holds the error); the rest of the batch goes on.

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


def decode_hidden(
    codec: Codec, header: Header, body: bytes | memoryview, split_model: SplitModel, carry: object | None
) -> torch.Tensor:
    """A payload's body -> the input of the back half's first block for its kept tokens ``(T_kept, D)``;
    BitstreamError when malformed. Token ids (split 0, nothing run on the edge) are embedded here.
    ``carry``: the stream's (Codec.new_carry), for a generation's payloads."""
    return _embedded(codec, codec.decode_body(header, body, carry), split_model)


def _embedded(codec: Codec, hidden: torch.Tensor, split_model: SplitModel) -> torch.Tensor:
    """What a codec decoded -> the back half's input: hidden states as they are, token ids embedded."""
    if not codec.codes_token_ids:
        return hidden
    ids = hidden.reshape(1, -1).long()
    with torch.inference_mode():
        return split_model.embed(ids, torch.ones_like(ids, dtype=torch.bool))[0]


def _decoded_alone(codec: Codec, job: CodedJob) -> torch.Tensor | Exception:
    """One payload's hidden states, or the error decoding it raised (a bug's as a RuntimeError)."""
    try:
        return codec.decode_body(job.header, job.body)
    except BitstreamError as exc:
        return exc
    except Exception as exc:
        return RuntimeError(f"decoding with {codec.name} failed: {type(exc).__name__}: {exc}")


def _by_codec(jobs: Sequence[CodedJob]) -> dict[str, list[int]]:
    """The indices of ``jobs``, grouped by the codec that coded them."""
    groups: dict[str, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(job.codec, []).append(index)
    return groups


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
        results: list[Answer | Exception] = [Answer()] * len(jobs)
        decoded: dict[int, tuple[BackJob, float]] = {}  # job index -> job, CPU seconds decoding it
        for codec_name, indices in _by_codec(jobs).items():
            codec = self.catalog.get(codec_name)
            started = time.thread_time()
            try:  # the payloads of one codec decode together, its transforms run once for all of them
                hidden: list[torch.Tensor | Exception] = list(
                    codec.decode_bodies([(jobs[i].header, jobs[i].body) for i in indices])
                )
            except Exception:  # a decoder bug: one at a time, so it fails only the payloads that trip it
                hidden = [_decoded_alone(codec, jobs[i]) for i in indices]
            seconds = (time.thread_time() - started) / len(indices)  # an equal share each
            for index, item in zip(indices, hidden, strict=True):
                if isinstance(item, Exception):
                    results[index] = item
                else:
                    job = BackJob(_embedded(codec, item, self._split_model), kept_positions(jobs[index].header))
                    decoded[index] = (job, seconds)
        order = sorted(decoded)
        answers = self.run(cut, [decoded[index][0] for index in order])
        for index, answer in zip(order, answers, strict=True):
            results[index] = dataclasses.replace(answer, decode_s=decoded[index][1])
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
