"""The container format: exact bytes, round trips, and one rejection per malformed case."""

from __future__ import annotations

import numpy as np
import pytest
from splitwire.codec import container
from splitwire.codec.container import Header, bits_per_token, pack, parse
from splitwire.codec.errors import BitstreamError


def test_header_is_three_bytes_for_a_short_input() -> None:
    payload = pack(Header(codec_kind=2, tokens=12, width=384), b"BODY")
    assert payload == bytes([0x51, 0x02, 12]) + b"BODY"
    header, body = parse(payload, width=384)
    assert (header.codec_kind, header.tokens, header.width, bytes(body)) == (2, 12, 384, b"BODY")


def test_explicit_width_is_written_as_a_varint() -> None:
    payload = pack(Header(codec_kind=2, tokens=12, width=384, explicit_width=True), b"")
    assert payload == bytes([0x51, 0x42, 12, 0x80, 0x03])
    assert parse(payload, width=16)[0].width == 384


def test_round_trip_with_token_mask() -> None:
    mask = np.array([1, 0, 1, 1, 0, 0, 0, 0, 1, 1], dtype=bool)
    payload = pack(Header(codec_kind=7, tokens=10, width=384, token_mask=mask), b"xyz")
    assert payload[1] == 0x87
    header, body = parse(payload, width=384)
    assert bytes(body) == b"xyz"
    assert header.codec_kind == 7 and header.tokens == 10 and header.width == 384
    assert header.token_mask is not None and header.token_mask.tolist() == mask.tolist()
    assert header.kept_tokens == 5


def test_large_values_use_multi_byte_varints() -> None:
    header, body = parse(pack(Header(codec_kind=1, tokens=300, width=60000, explicit_width=True), b""), width=8)
    assert (header.tokens, header.width, bytes(body)) == (300, 60000, b"")


def test_bits_per_token_counts_the_whole_payload() -> None:
    assert bits_per_token(payload_bytes=60, tokens=10) == 48.0


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "shorter than"),
        (b"\x51", "shorter than"),
        (b"\x41\x02\x0c", "not a splitwire payload"),
        (b"\x52\x02\x0c", "version 2 is not supported"),
        (b"\x51\x22\x0c", "reserved header flags"),
        (b"\x51\x02", "truncated header: token count"),
        (b"\x51\x42\x0c\x80", "truncated header: width"),
        (b"\x51\x02\xff\xff\xff\xff\xff\x01", "longer than 5 bytes"),
        (b"\x51\x02\x8c\x00\x01", "non-canonical varint"),
        (b"\x51\x02\x00", "claims 0 tokens"),
        (b"\x51\x02\xff\xff\x03", "claims 65535 tokens"),
        (b"\x51\x42\x01\x00", "claims width 0"),
        (b"\x51\x42\x01\x80\x80\x08", "claims width 131072"),
        (b"\x51\x82\x10\xff", "truncated token mask"),
        (b"\x51\x82\x04\xf1", "bits set past the last token"),
        (b"\x51\x82\x04\x00", "keeps no token"),
    ],
)
def test_parser_rejects(payload: bytes, message: str) -> None:
    with pytest.raises(BitstreamError, match=message):
        parse(payload, width=4, max_tokens=4096)


def test_parser_limits_come_from_the_caller() -> None:
    payload = pack(Header(codec_kind=1, tokens=100, width=8), b"")
    assert parse(payload, width=8, max_tokens=100)[0].tokens == 100
    with pytest.raises(BitstreamError, match="allowed are 1 to 99"):
        parse(payload, width=8, max_tokens=99)


def test_pack_refuses_inconsistent_headers() -> None:
    with pytest.raises(ValueError, match="token mask has shape"):
        pack(Header(codec_kind=1, tokens=3, width=4, token_mask=np.ones(2, dtype=bool)), b"")
    with pytest.raises(ValueError, match="does not fit"):
        pack(Header(codec_kind=40, tokens=3, width=4), b"")
    with pytest.raises(ValueError, match="at least one token"):
        pack(Header(codec_kind=1, tokens=0, width=4), b"")


def test_defaults_bound_what_a_header_may_claim() -> None:
    assert container.DEFAULT_MAX_TOKENS == 65536 and container.DEFAULT_MAX_WIDTH == 65536
