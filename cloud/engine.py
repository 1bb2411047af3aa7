"""The data plane: payload -> decoded hidden states -> batched back half -> answer.

::

    payload --codec.decode_payload--> (T_kept, D) --Batcher--> blocks [k, L) + head --> answer

Lifecycle: ``load()`` (blocking: weights, codecs, warm-up) -> ``ready`` -> ``start()`` on the event
loop -> ``infer()`` many times -> ``stop()``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from splitwire.cloud import metrics
from splitwire.cloud.batching import Batcher
from splitwire.cloud.config import ServerConfig
from splitwire.cloud.errors import InvalidInput, ModelNotReady, NotFound, PeerMismatch
from splitwire.codec.base import Codec
from splitwire.codec.catalog import CodecCatalog
from splitwire.codec.container import Header
from splitwire.codec.errors import BitstreamError, UnknownCodecError
from splitwire.split.cut import Cut, InvalidSplitError, SplitModel
from splitwire.split.models import LoadedModel, ModelFamily, load_model, resolve_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """What the head answered for one sequence: an embedding or a next token."""

    embedding: np.ndarray | None = None  # (D,) float32, encoders
    token_id: int | None = None  # decoders
    token_logprob: float | None = None


@dataclass(frozen=True)
class InferenceResult:
    answer: Answer
    header: Header
    payload_bytes: int
    decode_s: float
    queue_s: float
    compute_s: float
    batch_size: int


@dataclass(frozen=True)
class _BackJob:
    hidden: torch.Tensor  # (T_kept, D)
    positions: torch.Tensor  # (T_kept,) original positions of the kept tokens


class InferenceEngine:
    """One model's back half, its codecs and its batcher."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.model: LoadedModel | None = None
        self.catalog: CodecCatalog | None = None
        self._split_model: SplitModel | None = None
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitwire-compute")
        self._decode = ThreadPoolExecutor(max_workers=2, thread_name_prefix="splitwire-decode")
        self._batcher: Batcher[Cut, _BackJob, Answer] | None = None
        self._ready = False
        self._draining = False

    # -- lifecycle ------------------------------------------------------------------------------

    def load(self) -> None:
        """Load weights and codecs and run one warm-up batch. Blocking; run it off the event loop."""
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        model = load_model(self.config.model)
        self.model = model
        self._split_model = SplitModel(model)
        self.catalog = CodecCatalog.for_model(model.fingerprint, model.hidden_size)
        if self.config.codec is not None:
            self.catalog.get(self.config.codec)  # fail at start-up, not on the first request
        cut = self.default_cut()
        warm = _BackJob(torch.zeros(4, model.hidden_size), torch.arange(4))
        self._run_back(cut, [warm])
        self._ready = True
        metrics.MODEL_READY.labels(model.name).set(1)
        log.info("model %s ready: %d blocks, default split %d", model.name, model.num_blocks, cut.split)

    def start(self) -> None:
        """Start batching on the running event loop."""
        self._batcher = Batcher(
            self._run_back,
            self._compute,
            max_batch_size=self.config.max_batch_size,
            max_queue_delay_s=self.config.max_queue_delay_ms / 1000.0,
            max_queue=self.config.max_queue,
            on_batch=self._observe_batch,
        )
        self._batcher.start()

    def drain(self) -> None:
        """Refuse new work from now on (in-flight requests still finish)."""
        self._draining = True
        if self.model is not None:
            metrics.MODEL_READY.labels(self.model.name).set(0)

    async def stop(self) -> None:
        if self._batcher is not None:
            await self._batcher.stop()
        self._compute.shutdown(wait=False, cancel_futures=True)
        self._decode.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return self._ready and not self._draining

    def healthy(self) -> bool:
        """Alive and able to serve: loaded, not draining, batcher running."""
        return self.ready and self._batcher is not None

    @property
    def max_tokens(self) -> int:
        assert self.model is not None
        return self.config.max_tokens or self.model.spec.max_tokens

    @property
    def queue_depth(self) -> int:
        return self._batcher.depth if self._batcher else 0

    # -- request validation -------------------------------------------------------------------

    def default_cut(self) -> Cut:
        assert self.model is not None
        return Cut.from_wire(self.model, self.config.split)

    def split_points(self) -> list[int]:
        assert self.model is not None
        return list(range(self.model.num_blocks + 1))

    def resolve(self, model_name: str, split: int | None, codec_name: str) -> tuple[Cut, Codec]:
        """Check the request's model, split and codec against what this server serves."""
        if not self.ready or self.model is None or self.catalog is None:
            raise ModelNotReady("the model is not loaded yet or the server is draining; retry shortly")
        if model_name and resolve_name(model_name) != self.model.name:
            raise NotFound(f"unknown model {model_name!r}; this server serves {self.model.name!r}")
        try:
            cut = self.default_cut() if split is None else Cut.from_wire(self.model, split)
        except InvalidSplitError as exc:
            raise InvalidInput(str(exc)) from None
        try:
            codec = self.catalog.get(codec_name or self.default_codec_name(cut.split))
        except UnknownCodecError as exc:
            raise NotFound(str(exc)) from None
        if not codec.valid_at(cut.split):
            raise InvalidInput(
                f"codec {codec.name} was trained for split(s) {list(codec.splits)}, not split {cut.split}"
            )
        return cut, codec

    def default_codec_name(self, split: int) -> str:
        assert self.catalog is not None
        name = self.config.codec or self.catalog.default
        return name if self.catalog.get(name).valid_at(split) else "fp16"

    def check_peer(self, model_fingerprint: str | None, codec: Codec, codec_fingerprint: str | None) -> None:
        """Refuse a client whose weights differ from ours (its fingerprints travel in metadata)."""
        assert self.model is not None
        if model_fingerprint and model_fingerprint != self.model.fingerprint:
            raise PeerMismatch(
                f"model fingerprint mismatch: client has {model_fingerprint}, server has "
                f"{self.model.fingerprint} for {self.model.name}; install the same model package on both sides"
            )
        if codec_fingerprint and codec_fingerprint != codec.fingerprint():
            raise PeerMismatch(
                f"codec {codec.name} fingerprint mismatch: client has {codec_fingerprint}, server has "
                f"{codec.fingerprint()}; use the same splitwire release on both sides"
            )

    # -- the work ---------------------------------------------------------------------------

    async def infer(self, cut: Cut, codec: Codec, payload: bytes, deadline: float | None) -> InferenceResult:
        """Decode ``payload`` and run the back half on it, batched with other requests."""
        if self._batcher is None:
            raise ModelNotReady("the server is not started")
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        header, hidden = await loop.run_in_executor(self._decode, self._decode_payload, codec, payload)
        decode_s = time.monotonic() - started
        positions = torch.from_numpy(np.flatnonzero(header.kept_mask()))
        answer, timing = await self._batcher.submit(cut, _BackJob(hidden, positions), deadline)
        return InferenceResult(
            answer=answer,
            header=header,
            payload_bytes=len(payload),
            decode_s=decode_s,
            queue_s=timing.queue_s,
            compute_s=timing.compute_s,
            batch_size=timing.batch_size,
        )

    def _decode_payload(self, codec: Codec, payload: bytes) -> tuple[Header, torch.Tensor]:
        try:
            return codec.decode_payload(payload, max_tokens=self.max_tokens)
        except BitstreamError as exc:
            raise InvalidInput(f"malformed payload for codec {codec.name}: {exc}") from None

    def _run_back(self, cut: Cut, jobs: Sequence[_BackJob]) -> list[Answer]:
        """Pad ``jobs`` to one batch, run blocks [split, L) and the head. Runs on the compute thread."""
        assert self.model is not None and self._split_model is not None
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

    def _observe_batch(self, size: int) -> None:
        assert self.model is not None
        metrics.BATCH_SIZE.labels(self.model.name).observe(size)
