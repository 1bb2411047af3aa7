"""Errors raised by codecs. Callers map them to their own protocol; codecs know nothing of gRPC."""

from __future__ import annotations


class CodecError(Exception):
    """Base class of everything a codec raises on purpose."""


class BitstreamError(CodecError, ValueError):
    """The payload is malformed: bad header, truncated or oversized body, undecodable symbols."""


class UnknownCodecError(CodecError, LookupError):
    """No codec of that name (or kind) is available for this model and split."""


class CodecNotReadyError(CodecError, RuntimeError):
    """A learned codec was used before its integer coding tables were built."""
