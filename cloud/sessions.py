"""A limit on concurrently open sessions (InferStream streams, generation sessions among them).

Each open session holds a connection's buffers and, for a generation, the back half's KV cache: the
limit bounds that memory (with the servicer's idle timeout, which closes streams that went quiet).
Single event loop, so a plain counter is enough.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from splitwire.cloud import metrics
from splitwire.cloud.errors import Overloaded

RETRY_AFTER_MS = 1000


class SessionLimiter:
    """Admits at most ``limit`` sessions at a time; one more is refused with :class:`Overloaded`."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the session limit must be at least 1, got {limit}")
        self.limit = limit
        self._open = 0

    @property
    def open_sessions(self) -> int:
        return self._open

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Hold one session slot for the ``with`` block; raises Overloaded when all are taken."""
        if self._open >= self.limit:
            raise Overloaded(
                f"too many open sessions ({self.limit}); close a stream or retry in {RETRY_AFTER_MS} ms",
                RETRY_AFTER_MS,
                reason="too_many_sessions",
            )
        self._open += 1
        metrics.OPEN_SESSIONS.inc()
        try:
            yield
        finally:
            self._open -= 1
            metrics.OPEN_SESSIONS.dec()
