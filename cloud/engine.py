"""The data plane: payload -> decoded hidden states -> batched back half -> answer.

::

    payload --codec.parse_payload (event loop)--> header + body --Batcher--> BackHalf.run_coded, in a
        compute process (ComputeProcess) or on the compute thread: decode each body to (T_kept, D),
        blocks [k, L) + head on the batch --> answer

Lifecycle: ``load()`` (blocking: weights, codecs, compute process, warm-up) -> ``ready`` -> ``start()``
on the event loop -> ``infer()`` many times -> ``drain()`` -> ``stop()``.

Generation (decoder models): a session per stream holds the back half's KV cache and sampler
(:mod:`splitwire.cloud.generation`). Its steps are stateful and come one at a time per session, so they
are not batched: each runs alone on the compute thread of this process (also when batches go to the
compute process, whose copy of the model keeps no caches). Sessions are bounded by ``max_sessions``
(one per stream) and by the servicer's idle timeout; the cache is freed whatever ends the session.

The event loop only parses a payload's header (checking its claims against the limits); the body is
decoded where the back half runs, so the loop's core serves gRPC. Generation steps, which run one at
a time in this process, are decoded on the loop or a decode thread (:class:`DecodePlacer`).

Admission: a request is admitted only while fewer than ``max_queue`` requests wait for a batch; past
that it is refused at once with RESOURCE_EXHAUSTED, before its payload is decoded, so waiting work
and its memory stay bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch
from splitwire.cloud import metrics
from splitwire.cloud.back import Answer, BackHalf, BackJob, CodedJob, decode_hidden
from splitwire.cloud.batching import Batcher, Compute, on_executor
from splitwire.cloud.compute_process import ComputeProcess
from splitwire.cloud.config import ComputeMode, ServerConfig
from splitwire.cloud.decoding import DecodePlacer
from splitwire.cloud.errors import InvalidInput, ModelNotReady, NotFound, Overloaded, PeerMismatch, SessionIdle
from splitwire.cloud.generation import GeneratedToken, GenerationSession, SessionStateError
from splitwire.cloud.sessions import SessionLimiter
from splitwire.codec.base import Codec
from splitwire.codec.catalog import CodecCatalog
from splitwire.codec.container import Header
from splitwire.codec.errors import BitstreamError, UnknownCodecError
from splitwire.split.cut import Cut, InvalidSplitError, SplitModel
from splitwire.split.models import LoadedModel, ModelFamily, load_model, resolve_name
from splitwire.split.sampling import SamplingParams

log = logging.getLogger(__name__)

Done = TypeVar("Done")

# One batch computing and the next already handed over, so compute never waits for the event loop.
BATCHES_IN_FLIGHT = 2


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
class GenerationStepResult:
    token: GeneratedToken
    header: Header
    payload_bytes: int
    decode_s: float
    compute_s: float


class InferenceEngine:
    """One model's back half, its codecs and its batcher."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.model: LoadedModel | None = None
        self.catalog: CodecCatalog | None = None
        self._back: BackHalf | ComputeProcess | None = None
        self._split_model: SplitModel | None = None  # embeds token-ids payloads; generation steps
        self._decoder: SplitModel | None = None  # the same, decoder models only
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitwire-compute")
        self._decode_pool = ThreadPoolExecutor(max_workers=config.decode_threads, thread_name_prefix="splitwire-decode")
        self._placer = DecodePlacer(self._decode_pool)
        self._batcher: Batcher[Cut, CodedJob, Answer] | None = None
        self._codec_fingerprints: dict[str, str] = {}  # hashing a codec's parameters per request is too slow
        self._cuts: dict[int | None, Cut] = {}  # by wire split, None for the default: built once
        self._ready = False
        self._draining = False
        self.last_call_at = 0.0  # time.monotonic() of the latest inference call, refused ones included
        self.sessions = SessionLimiter(config.max_sessions)

    # -- lifecycle ------------------------------------------------------------------------------

    def load(self) -> None:
        """Load weights and codecs and warm the back half up. Blocking; run it off the event loop.

        With ``ComputeMode.PROCESS`` the compute process loads its copy of the model meanwhile.
        """
        process = None
        if self.config.compute is ComputeMode.PROCESS:
            process = ComputeProcess(
                self.config.model, self.config.torch_threads, on_busy=functools.partial(self._observe_busy, "batches")
            )
            process.spawn()
        elif self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        try:
            model = load_model(self.config.model)
            catalog = CodecCatalog.for_model(model.fingerprint, model.hidden_size, vocab_size=model.vocab_size)
            if self.config.codec is not None:
                catalog.get(self.config.codec)  # fail at start-up, not on the first request
            for codec in catalog:
                codec.warm_up()
            codec_fingerprints = {codec.name: codec.fingerprint() for codec in catalog}
            cut = Cut.from_wire(model, self.config.split)
            if process is not None:
                process.wait_ready(model.fingerprint, codec_fingerprints)
                self._back = process
            else:
                self._back = BackHalf(model, catalog)
                self._back.warm_up(cut)
        except BaseException:
            if process is not None:
                process.close()
            raise
        self.model, self.catalog = model, catalog
        self._split_model = SplitModel(model)
        if model.family is ModelFamily.DECODER:
            self._decoder = self._split_model
            if process is not None and self.config.torch_threads:
                torch.set_num_threads(self.config.torch_threads)  # generation steps run in this process
        self._codec_fingerprints = codec_fingerprints
        self._cuts = {split: Cut(model.num_blocks, split) for split in range(model.num_blocks + 1)}
        self._cuts[None] = cut
        self._ready = True
        metrics.MODEL_READY.labels(model.name).set(1)
        for codec in catalog:
            if codec.expected_bits_per_token:
                metrics.CODEC_EXPECTED_BITS_PER_TOKEN.labels(model.name, codec.name).set(codec.expected_bits_per_token)
        log.info(
            "model %s ready: %d blocks, default split %d, back half in a %s",
            model.name,
            model.num_blocks,
            cut.split,
            self.config.compute.value,
        )

    def start(self) -> None:
        """Start batching on the running event loop."""
        self._batcher = Batcher(
            self._batch_compute(),
            max_batch_size=self.config.max_batch_size,
            max_queue_delay_s=self.config.max_queue_delay_ms / 1000.0,
            max_queue=self.config.max_queue,
            on_batch=self._observe_batch,
            max_in_flight=BATCHES_IN_FLIGHT,
        )
        self._batcher.start()
        metrics.QUEUE_DEPTH.set_function(lambda: self.queue_depth)

    def drain(self) -> None:
        """Refuse new work from now on (in-flight requests still finish)."""
        self._draining = True
        if self.model is not None:
            metrics.MODEL_READY.labels(self.model.name).set(0)

    async def stop(self) -> None:
        """Stop batching and release the threads and the compute process. Call after draining."""
        if self._batcher is not None:
            await self._batcher.stop()
        self._compute.shutdown(wait=False, cancel_futures=True)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        if self._back is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._back.close)

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
        """Admitted requests waiting for a batch."""
        return self._batcher.depth if self._batcher else 0

    # -- request validation -------------------------------------------------------------------

    def default_cut(self) -> Cut:
        assert self.model is not None
        return self._cuts.get(None) or Cut.from_wire(self.model, self.config.split)

    def split_points(self) -> list[int]:
        assert self.model is not None
        return list(range(self.model.num_blocks + 1))

    def resolve(self, model_name: str, split: int | None, codec_name: str) -> tuple[Cut, Codec]:
        """Check the request's model, split and codec against what this server serves."""
        self.last_call_at = time.monotonic()
        if not self.ready or self.model is None or self.catalog is None:
            raise ModelNotReady("the model is not loaded yet or the server is draining; retry shortly")
        if model_name and resolve_name(model_name) != self.model.name:
            raise NotFound(f"unknown model {model_name!r}; this server serves {self.model.name!r}")
        try:
            cut = self._cuts.get(split) or Cut.from_wire(self.model, split)
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
        if codec_fingerprint and codec_fingerprint != self.codec_fingerprint(codec):
            raise PeerMismatch(
                f"codec {codec.name} fingerprint mismatch: client has {codec_fingerprint}, server has "
                f"{self.codec_fingerprint(codec)}; use the same splitwire release on both sides"
            )

    def codec_fingerprint(self, codec: Codec) -> str:
        """``codec.fingerprint()``, computed once at load."""
        known = self._codec_fingerprints.get(codec.name)
        return known if known is not None else codec.fingerprint()

    # -- the work ---------------------------------------------------------------------------

    async def infer(self, cut: Cut, codec: Codec, payload: bytes, deadline: float | None) -> InferenceResult:
        """Decode ``payload`` and run the back half on it, batched with other requests."""
        if self._batcher is None:
            raise ModelNotReady("the server is not started")
        if self.queue_depth >= self.config.max_queue:
            retry_ms = self._batcher.retry_after_ms()
            raise Overloaded(
                f"server queue is full ({self.config.max_queue} requests waiting); retry in {retry_ms} ms", retry_ms
            )
        header, body = self._parse(codec, payload)
        try:
            answer, timing = await self._batcher.submit(cut, CodedJob(codec.name, header, bytes(body)), deadline)
        except BitstreamError as exc:  # the body did not decode
            raise _malformed(codec, exc) from None
        return InferenceResult(
            answer=answer,
            header=header,
            payload_bytes=len(payload),
            decode_s=answer.decode_s,
            queue_s=timing.queue_s,
            compute_s=timing.compute_s,
            batch_size=timing.batch_size,
        )

    @contextlib.contextmanager
    def generation(self, cut: Cut, codec: Codec, params: SamplingParams) -> Iterator[GenerationSession]:
        """A generation session for one stream. Its KV cache is freed when the block exits, whatever
        ends it (finish, the client closing or cancelling, a disconnect, an error, the idle timeout)."""
        if self.model is None or self._back is None:
            raise ModelNotReady("the model is not loaded yet")
        if self._decoder is None:
            raise InvalidInput(f"{self.model.name} is an encoder: only decoder models generate")
        session = GenerationSession(self._decoder, cut, codec, params, self.max_tokens)
        model = self.model.name
        metrics.GENERATION_SESSIONS.labels(model).inc()
        reason = "error"
        try:
            yield session
            # Not finished: the client closed its side early. A cancel or disconnect may also end the
            # request stream that way before the task is cancelled, so both count as "cancelled".
            reason = session.finished.value if session.finished is not None else "cancelled"
        except (asyncio.CancelledError, GeneratorExit):
            reason = "cancelled"
            raise
        except SessionIdle:
            reason = "idle_timeout"
            raise
        finally:
            session.close()
            metrics.GENERATION_SESSIONS.labels(model).dec()
            metrics.GENERATION_ENDED.labels(model, reason).inc()
            log.debug("generation session ended (%s) after %d tokens", reason, session.generated)

    async def generation_step(self, session: GenerationSession, payload: bytes) -> GenerationStepResult:
        """Decode one payload of ``session`` (the prompt, then one token) and choose the next token."""
        started = time.monotonic()
        codec = session.codec
        header, hidden = await self._decode(codec, payload, session.carry)
        try:
            session.check(header)
        except SessionStateError as exc:
            raise InvalidInput(str(exc)) from None
        decoded = time.monotonic()
        try:
            token = await asyncio.get_running_loop().run_in_executor(
                self._compute, self._counted_busy, "generation", session.advance, hidden
            )
        except SessionStateError as exc:
            raise InvalidInput(str(exc)) from None
        return GenerationStepResult(
            token=token,
            header=header,
            payload_bytes=len(payload),
            decode_s=decoded - started,
            compute_s=time.monotonic() - decoded,
        )

    def _parse(self, codec: Codec, payload: bytes) -> tuple[Header, memoryview]:
        """The payload's header, checked against the limits, and its body; InvalidInput when malformed."""
        try:
            return codec.parse_payload(payload, max_tokens=self.max_tokens)
        except BitstreamError as exc:
            raise _malformed(codec, exc) from None

    async def _decode(self, codec: Codec, payload: bytes, carry: object | None) -> tuple[Header, torch.Tensor]:
        """Payload -> header and the kept tokens' hidden states ``(T_kept, D)``, on the event loop or a
        decode thread by the predicted cost of the tokens the header claims; InvalidInput when malformed.
        ``carry``: the stream's (Codec.new_carry), for a generation's payloads."""
        header, body = self._parse(codec, payload)
        decode = functools.partial(self._decode_body, codec, header, body, carry)
        hidden = await self._placer.run(codec.name, len(payload), header.kept_tokens, decode)
        return header, hidden

    def _decode_body(self, codec: Codec, header: Header, body: memoryview, carry: object | None) -> torch.Tensor:
        """The costly half of decoding, wherever the placer runs it."""
        assert self._split_model is not None
        try:
            return decode_hidden(codec, header, body, self._split_model, carry)
        except BitstreamError as exc:
            raise _malformed(codec, exc) from None

    def _batch_compute(self) -> Compute:
        """The Batcher's compute function: submit to the compute process, or run on the compute thread."""
        back = self._back
        if isinstance(back, ComputeProcess):

            async def in_process(cut: Cut, jobs: Sequence[CodedJob]) -> list[Answer | Exception]:
                return await asyncio.wrap_future(back.submit(cut, jobs))

            return in_process
        return on_executor(self._compute, functools.partial(self._counted_busy, "batches", self.run_coded))

    def _counted_busy(self, work: str, run: Callable[..., Done], *args: object) -> Done:
        """``run(*args)`` on this process's compute thread, its wall time counted as ``work``."""
        started = time.monotonic()
        try:
            return run(*args)
        finally:
            self._observe_busy(work, time.monotonic() - started)

    def run_coded(self, cut: Cut, jobs: Sequence[CodedJob]) -> list[Answer | Exception]:
        """Decode ``jobs`` (together, per codec), then :meth:`run_back` on them: the compute thread's work
        per batch, and the compute process's (``splitwire-bench compute --with-decoding`` times this)."""
        if self._back is None:
            raise ModelNotReady("the model is not loaded yet")
        return self._back.run_coded(cut, jobs)

    def run_back(self, cut: Cut, jobs: Sequence[BackJob]) -> list[Answer]:
        """Blocks [split, L) and the head on decoded ``jobs`` padded into one batch, where the server runs
        them (``splitwire-bench compute`` times this: the back half without decoding or gRPC)."""
        if self._back is None:
            raise ModelNotReady("the model is not loaded yet")
        return self._back.run(cut, jobs)

    def _observe_batch(self, size: int) -> None:
        assert self.model is not None
        metrics.BATCH_SIZE.labels(self.model.name).observe(size)

    def _observe_busy(self, work: str, seconds: float) -> None:
        """Count wall time on the back half (for batches in the compute process, called on its receiver thread)."""
        if self.model is not None:  # work runs only once the model is loaded
            metrics.COMPUTE_BUSY.labels(self.model.name, work).inc(seconds)


def _malformed(codec: Codec, exc: BitstreamError) -> InvalidInput:
    return InvalidInput(f"malformed payload for codec {codec.name}: {exc}")
