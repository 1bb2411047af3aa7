"""Errors raised by codecs. Callers map them to their own protocol; codecs know nothing of gRPC."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

Decoded = TypeVar("Decoded")


class CodecError(Exception):
    """Base class of everything a codec raises on purpose."""


class BitstreamError(CodecError, ValueError):
    """The payload is malformed: bad header, truncated or oversized body, undecodable symbols."""


class UnknownCodecError(CodecError, LookupError):
    """No codec of that name (or kind) is available for this model and split."""


class CodecNotReadyError(CodecError, RuntimeError):
    """A learned codec was used before its integer coding tables were built."""


def each_or_error(decode: Callable[..., Decoded], items: Iterable[tuple]) -> list[Decoded | BitstreamError]:
    """``decode(*item)`` for each item, in order, with the BitstreamError in the place of an item that does not
    decode: how a batch of payloads decodes one at a time, each failing alone."""
    results: list[Decoded | BitstreamError] = []
    for item in items:
        try:
            results.append(decode(*item))
        except BitstreamError as exc:
            results.append(exc)
    return results
