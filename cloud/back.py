"""The back half on a batch: pad decoded sequences of different lengths into one tensor with a mask,
run blocks [split, L) and the head, and split the output back into one answer per sequence.

::

    jobs [(T_i, D) hidden, (T_i,) positions] --pad to max T--> (B, T, D) + mask (B, T) + positions (B, T)
        --SplitModel.run_back--> (B, D) embeddings | (B, V) logits --> [Answer] * B

Padding is invisible to the answers: padded keys are masked out of attention and out of pooling, so a
sequence gets the same answer alone or in any batch (tests/test_engine.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from splitwire.split.cut import Cut, SplitModel
from splitwire.split.models import LoadedModel, ModelFamily


@dataclass(frozen=True)
class BackJob:
    """One decoded sequence waiting for the back half."""

    hidden: torch.Tensor  # (T_kept, D) float32
    positions: torch.Tensor  # (T_kept,) long: original positions of the kept tokens


@dataclass(frozen=True)
class Answer:
    """What the head answered for one sequence: an embedding or a next token."""

    embedding: np.ndarray | None = None  # (D,) float32, encoders
    token_id: int | None = None  # decoders
    token_logprob: float | None = None


class BackHalf:
    """Runs batches of :class:`BackJob` through one model's back half, on the calling thread."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self._split_model = SplitModel(model)

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
