"""The gRPC servicer: proto <-> domain objects, nothing more. Validation and work live in the engine.

An InferStream stream answers its requests in order. A request with ``generation`` set turns the rest
of the stream into a generation session (see GenerationOptions in the .proto file)::

    opening request (options + prompt payload) -> token, step payload -> token, ... -> last token + finish reason

Every stream holds one of ``max_sessions`` slots; one that sends nothing for ``session_idle_timeout_s``
is closed with DEADLINE_EXCEEDED, which frees its slot and its generation state.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import grpc
from splitwire.cloud import metrics
from splitwire.cloud.engine import GenerationStepResult, InferenceEngine, InferenceResult
from splitwire.cloud.errors import InvalidInput, SessionIdle
from splitwire.cloud.generation import FinishReason, GenerationSession
from splitwire.codec.base import Codec
from splitwire.codec.container import bits_per_token
from splitwire.split.cut import Cut
from splitwire.split.models import resolve_name
from splitwire.split.sampling import SamplingParams
from splitwire.split.transport import CODEC_FINGERPRINT_KEY, MODEL_FINGERPRINT_KEY
from splitwire.v1 import splitwire_pb2 as pb
from splitwire.v1 import splitwire_pb2_grpc as pb_grpc

MAX_REQUEST_ID_BYTES = 128

_FINISH_REASONS = {
    FinishReason.STOP_TOKEN: pb.FINISH_REASON_STOP_TOKEN,
    FinishReason.MAX_NEW_TOKENS: pb.FINISH_REASON_MAX_NEW_TOKENS,
}


class SplitInferenceServicer(pb_grpc.SplitInferenceServicer):
    def __init__(self, engine: InferenceEngine, version: str) -> None:
        self._engine = engine
        self._version = version

    async def Infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferResponse:
        return await self._infer_one(request, context)

    async def InferStream(
        self, request_iterator: AsyncIterator[pb.InferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.InferResponse]:
        with self._engine.sessions.session():  # at most --max-sessions streams at once
            requests = aiter(request_iterator)
            while (request := await self._next_request(requests)) is not None:
                if request.HasField("generation"):
                    async for response in self._generate(request, requests, context):
                        yield response
                    return
                yield await self._infer_one(request, context)

    async def GetServerInfo(self, request: pb.ServerInfoRequest, context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        engine = self._engine
        model, catalog = engine.model, engine.catalog
        if model is None or catalog is None:
            return pb.ServerInfo(version=self._version)
        default_split = engine.default_cut().split
        codecs = [
            pb.CodecInfo(
                name=codec.name,
                kind=codec.kind.label,
                fingerprint=engine.codec_fingerprint(codec),
                splits=list(codec.splits),
                expected_bits_per_token=codec.expected_bits_per_token or 0.0,
            )
            for codec in catalog
        ]
        info = pb.ModelInfo(
            name=model.name,
            family=model.family.value,
            fingerprint=model.fingerprint,
            num_blocks=model.num_blocks,
            hidden_size=model.hidden_size,
            default_split=default_split,
            splits=engine.split_points(),
            codecs=codecs,
            default_codec=engine.default_codec_name(default_split),
        )
        return pb.ServerInfo(
            version=self._version,
            models=[info],
            default_model=model.name,
            max_message_bytes=engine.config.max_message_bytes,
            max_tokens=engine.max_tokens,
        )

    async def _next_request(self, requests: AsyncIterator[pb.InferRequest]) -> pb.InferRequest | None:
        """The stream's next request; None when the client has closed its side. Raises SessionIdle."""
        idle_s = self._engine.config.session_idle_timeout_s
        try:
            async with asyncio.timeout(idle_s):
                return await anext(requests)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise SessionIdle(
                f"the stream sent nothing for {idle_s:g} s (the server's --session-idle-timeout); the server "
                "closed it and freed its session: open a new stream"
            ) from None

    def _resolve(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> tuple[Cut, Codec]:
        """Validate the request's id, model, split and codec and the peer's fingerprints."""
        if len(request.request_id.encode()) > MAX_REQUEST_ID_BYTES:
            raise InvalidInput(f"request_id is longer than {MAX_REQUEST_ID_BYTES} bytes")
        split = request.split if request.HasField("split") else None
        cut, codec = self._engine.resolve(request.model, split, request.codec)
        metadata = {key: value for key, value in context.invocation_metadata() or ()}
        self._engine.check_peer(metadata.get(MODEL_FINGERPRINT_KEY), codec, metadata.get(CODEC_FINGERPRINT_KEY))
        return cut, codec

    async def _generate(
        self, opening: pb.InferRequest, requests: AsyncIterator[pb.InferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.InferResponse]:
        """One generation session: the opening request's prefill, then one step per request until it finishes."""
        received = time.monotonic()
        cut, codec = self._resolve(opening, context)
        params = sampling_params(opening.generation)
        labels = (self._engine.model.name if self._engine.model else "", codec.name)
        with self._engine.generation(cut, codec, params) as session:
            request, last_sent = opening, None
            while True:
                result = await self._step(session, request, received)
                yield _token_response(request.request_id, result, time.monotonic() - received)
                now = time.monotonic()
                if last_sent is None:
                    metrics.TIME_TO_FIRST_TOKEN.labels(*labels).observe(now - received)
                else:
                    metrics.INTER_TOKEN_LATENCY.labels(*labels).observe(now - last_sent)
                last_sent = now
                if result.token.finish is not None:
                    return
                request = await self._next_request(requests)
                if request is None:  # the client closed its side early (a cancel can look the same)
                    return
                received = time.monotonic()
                _check_step(request, session, labels[0])

    async def _step(
        self, session: GenerationSession, request: pb.InferRequest, received: float
    ) -> GenerationStepResult:
        metrics.IN_FLIGHT.inc()
        try:
            result = await self._engine.generation_step(session, request.payload)
        finally:
            metrics.IN_FLIGHT.dec()
        assert self._engine.model is not None
        labels = (self._engine.model.name, session.codec.name)
        for stage, seconds in (
            ("decode", result.decode_s),
            ("compute", result.compute_s),
            ("total", time.monotonic() - received),
        ):
            metrics.REQUEST_LATENCY.labels(*labels, stage).observe(seconds)
        metrics.PAYLOAD_BYTES.labels(*labels).observe(result.payload_bytes)
        metrics.BITS_PER_TOKEN.labels(*labels).observe(bits_per_token(result.payload_bytes, result.header.tokens))
        return result

    async def _infer_one(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferResponse:
        started = time.monotonic()
        metrics.IN_FLIGHT.inc()
        try:
            cut, codec = self._resolve(request, context)
            remaining = context.time_remaining()
            deadline = started + remaining if remaining is not None else None
            result = await self._engine.infer(cut, codec, request.payload, deadline)
        finally:
            metrics.IN_FLIGHT.dec()
        total_s = time.monotonic() - started
        self._observe(codec.name, result, total_s)
        return _response(request.request_id, result, total_s)

    def _observe(self, codec: str, result: InferenceResult, total_s: float) -> None:
        assert self._engine.model is not None
        model = self._engine.model.name
        for stage, seconds in (
            ("decode", result.decode_s),
            ("queue", result.queue_s),
            ("compute", result.compute_s),
            ("total", total_s),
        ):
            metrics.REQUEST_LATENCY.labels(model, codec, stage).observe(seconds)
        metrics.PAYLOAD_BYTES.labels(model, codec).observe(result.payload_bytes)
        metrics.BITS_PER_TOKEN.labels(model, codec).observe(bits_per_token(result.payload_bytes, result.header.tokens))


def sampling_params(options: pb.GenerationOptions) -> SamplingParams:
    """GenerationOptions -> SamplingParams; InvalidInput when they make no sense."""
    if options.max_new_tokens < 1:
        raise InvalidInput("generation.max_new_tokens must be at least 1")
    top_p = options.top_p if options.HasField("top_p") else 1.0
    if not (math.isfinite(options.temperature) and math.isfinite(top_p)):
        raise InvalidInput("generation.temperature and generation.top_p must be finite numbers")
    try:
        return SamplingParams(
            max_new_tokens=options.max_new_tokens,
            temperature=options.temperature,
            top_p=top_p,
            seed=options.seed,
            stop_tokens=frozenset(options.stop_token_ids),
        )
    except ValueError as exc:
        raise InvalidInput(f"generation options: {exc}") from None


def _check_step(request: pb.InferRequest, session: GenerationSession, model: str) -> None:
    """A step may repeat the session's model, split and codec, but not change them or open another session."""
    if request.HasField("generation"):
        raise InvalidInput("this stream already has a generation session; open a new stream for another")
    if len(request.request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise InvalidInput(f"request_id is longer than {MAX_REQUEST_ID_BYTES} bytes")
    changed = []
    if request.model and resolve_name(request.model) != model:
        changed.append(f"model {request.model!r}")
    if request.HasField("split") and request.split != session.cut.split:
        changed.append(f"split {request.split}")
    if request.codec and request.codec != session.codec.name:
        changed.append(f"codec {request.codec!r}")
    if changed:
        raise InvalidInput(
            f"a generation step cannot change the session's model, split or codec (got {', '.join(changed)}; "
            f"the session uses split {session.cut.split} and codec {session.codec.name})"
        )


def _token_response(request_id: str, result: GenerationStepResult, total_s: float) -> pb.InferResponse:
    token = result.token
    return pb.InferResponse(
        request_id=request_id,
        next_token=pb.NextToken(id=token.token_id, logprob=token.logprob),
        payload_bytes=result.payload_bytes,
        tokens=result.header.tokens,
        timing=pb.ServerTiming(
            decode_ms=1000 * result.decode_s, compute_ms=1000 * result.compute_s, total_ms=1000 * total_s
        ),
        finish_reason=_FINISH_REASONS[token.finish] if token.finish is not None else pb.FINISH_REASON_UNSPECIFIED,
    )


def _response(request_id: str, result: InferenceResult, total_s: float) -> pb.InferResponse:
    response = pb.InferResponse(
        request_id=request_id,
        payload_bytes=result.payload_bytes,
        tokens=result.header.tokens,
        timing=pb.ServerTiming(
            decode_ms=1000 * result.decode_s,
            queue_ms=1000 * result.queue_s,
            compute_ms=1000 * result.compute_s,
            total_ms=1000 * total_s,
        ),
    )
    answer = result.answer
    if answer.embedding is not None:
        response.embedding.values.extend(answer.embedding.tolist())
    else:
        response.next_token.id = answer.token_id or 0
        response.next_token.logprob = answer.token_logprob or 0.0
    return response
