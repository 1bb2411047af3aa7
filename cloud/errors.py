"""Domain errors of the cloud server. The error-mapping interceptor turns them into gRPC statuses;
nothing else in the server picks status codes.

``reason`` labels the ``splitwire_cloud_rejected_requests_total`` counter; errors without a reason of
their own are counted under their status code's name.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class: a request the server refuses on purpose, with a message meant for the client."""

    reason: str | None = None


class InvalidInput(ServingError):
    """The request is malformed or inconsistent (INVALID_ARGUMENT)."""


class NotFound(ServingError):
    """The request names a model or codec the server does not serve (NOT_FOUND)."""


class PeerMismatch(ServingError):
    """The client holds different model or codec weights than the server (FAILED_PRECONDITION)."""


class ModelNotReady(ServingError):
    """The model is still loading or the server is draining (UNAVAILABLE)."""


class Overloaded(ServingError):
    """A limit is reached (the queue, open sessions); retry after ``retry_after_ms`` (RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, retry_after_ms: int, reason: str = "queue_full") -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms
        self.reason = reason


class DeadlineExceeded(ServingError):
    """The client's deadline passed before the work was done (DEADLINE_EXCEEDED)."""

    reason = "deadline_exceeded"


class SessionIdle(ServingError):
    """A stream sent nothing for longer than the server's idle timeout (DEADLINE_EXCEEDED)."""

    reason = "session_idle"


class Unauthenticated(ServingError):
    """The call carries no bearer token or the wrong one (UNAUTHENTICATED)."""

    reason = "unauthenticated"
