"""The gRPC servicer: proto <-> domain objects, nothing more. Validation and work live in the engine."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
from splitwire.cloud import metrics
from splitwire.cloud.engine import InferenceEngine, InferenceResult
from splitwire.cloud.errors import InvalidInput
from splitwire.codec.container import bits_per_token
from splitwire.split.transport import CODEC_FINGERPRINT_KEY, MODEL_FINGERPRINT_KEY
from splitwire.v1 import splitwire_pb2 as pb
from splitwire.v1 import splitwire_pb2_grpc as pb_grpc

MAX_REQUEST_ID_BYTES = 128


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
            async for request in request_iterator:
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

    async def _infer_one(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferResponse:
        started = time.monotonic()
        metrics.IN_FLIGHT.inc()
        try:
            if len(request.request_id.encode()) > MAX_REQUEST_ID_BYTES:
                raise InvalidInput(f"request_id is longer than {MAX_REQUEST_ID_BYTES} bytes")
            split = request.split if request.HasField("split") else None
            cut, codec = self._engine.resolve(request.model, split, request.codec)
            metadata = {key: value for key, value in context.invocation_metadata() or ()}
            self._engine.check_peer(metadata.get(MODEL_FINGERPRINT_KEY), codec, metadata.get(CODEC_FINGERPRINT_KEY))
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
