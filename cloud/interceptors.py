"""Cross-cutting concerns of the gRPC server: mapping errors to status codes, counting outcomes, auth.

This is the one place that decides which gRPC status a failure gets. Servicers, the engine and the
auth interceptor raise domain errors; anything unexpected becomes INTERNAL with a generic message and
a logged traceback. Install them as ``[ErrorMappingInterceptor(), AuthInterceptor(token)]``: the first
is outermost, so it also maps the auth interceptor's refusals.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from splitwire.cloud import errors, metrics
from splitwire.codec.errors import BitstreamError, UnknownCodecError
from splitwire.split.cut import InvalidSplitError
from splitwire.split.models import UnknownModelError
from splitwire.split.security import presented_token, token_matches
from splitwire.split.transport import SERVICE_NAME

log = logging.getLogger(__name__)

# Order matters: the first matching class wins.
_STATUS_FOR: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (BitstreamError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidSplitError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (UnknownCodecError, grpc.StatusCode.NOT_FOUND),
    (UnknownModelError, grpc.StatusCode.NOT_FOUND),
    (errors.PeerMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ModelNotReady, grpc.StatusCode.UNAVAILABLE),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.SessionIdle, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
)

# gRPC's own retry policy reads this trailer; clients of ours read it as a hint too.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


def status_for(exc: Exception) -> grpc.StatusCode | None:
    for cls, code in _STATUS_FOR:
        if isinstance(exc, cls):
            return code
    return None


def _method_name(full: str) -> str:
    return full.rsplit("/", 1)[-1]


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns domain errors into statuses and counts every finished RPC of our service by code."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        method = _method_name(handler_call_details.method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(method, handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap_unary(self, method: str, behavior: Callable) -> Callable:
        async def unary(request: object, context: grpc.aio.ServicerContext) -> object:
            try:
                response = await behavior(request, context)
            except BaseException as exc:
                await _fail(method, exc, context)
                raise  # unreachable: _fail aborts or re-raises
            _count(method, context)
            return response

        return unary

    def _wrap_stream(self, method: str, behavior: Callable) -> Callable:
        async def stream(requests: AsyncIterator[object], context: grpc.aio.ServicerContext) -> AsyncIterator:
            try:
                async for response in behavior(requests, context):
                    yield response
            except BaseException as exc:
                await _fail(method, exc, context)
                raise
            _count(method, context)

        return stream


def _count(method: str, context: grpc.aio.ServicerContext) -> None:
    code = context.code() or grpc.StatusCode.OK
    metrics.REQUESTS.labels(method, code.name).inc()


async def _fail(method: str, exc: BaseException, context: grpc.aio.ServicerContext) -> None:
    """Record and abort with the mapped status. Always raises."""
    if isinstance(exc, asyncio.CancelledError):
        metrics.REQUESTS.labels(method, grpc.StatusCode.CANCELLED.name).inc()
        raise exc
    if isinstance(exc, grpc.aio.AbortError):  # a handler already chose its status
        _count(method, context)
        raise exc
    code = status_for(exc) if isinstance(exc, Exception) else None
    if code is None:
        log.exception("unexpected error in %s", method, exc_info=exc)
        code, message = grpc.StatusCode.INTERNAL, "internal server error; the server log has the details"
    else:
        message = str(exc)
        metrics.REJECTED.labels(getattr(exc, "reason", None) or code.name.lower()).inc()
    trailers: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, errors.Overloaded):
        trailers = ((RETRY_PUSHBACK_KEY, str(exc.retry_after_ms)),)
    metrics.REQUESTS.labels(method, code.name).inc()
    await context.abort(code, message, trailers)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every call of the SplitInference service.

    Health checks and reflection stay open, so load balancers and tools need no token. A call without
    the right token gets a handler that raises :class:`~splitwire.cloud.errors.Unauthenticated`
    before reading anything, which the error-mapping interceptor turns into UNAUTHENTICATED.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("AuthInterceptor needs a non-empty token")
        self._token = token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        presented = presented_token(handler_call_details.invocation_metadata)
        if token_matches(presented, self._token):
            return handler
        if presented is None:
            refusal = errors.Unauthenticated(
                "missing bearer token: send 'authorization: Bearer <token>' metadata (splitwire-edge --auth-token-file)"
            )
        else:
            refusal = errors.Unauthenticated("invalid bearer token")
        return _refusing_handler(handler, refusal)


def _refusing_handler(handler: grpc.RpcMethodHandler, refusal: Exception) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that raises ``refusal`` at once."""

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        raise refusal

    async def refuse_stream(requests: AsyncIterator[object], context: grpc.aio.ServicerContext) -> AsyncIterator:
        raise refusal
        yield  # an async generator, as stream handlers are

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **kwargs)
