"""Fuzzing the bitstream parser and every decoder: random bytes, truncations, bit flips, appended junk and
forged headers (huge token counts and widths, stray flags, masks) either decode to finite values of the
declared shape or raise BitstreamError with a message. Nothing else: no other exception, no hang, no
allocation sized by what the header claims.

The default run keeps example counts small; ``pytest -m slow tests/test_fuzz.py`` runs the long campaign
(see the README, "Hostile input").
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from splitwire.codec import container
from splitwire.codec.base import Codec
from splitwire.codec.catalog import BUILTIN_CODECS, load_checkpoint, read_manifest
from splitwire.codec.errors import BitstreamError
from splitwire.codec.token_ids import TokenIdsCodec
from test_learned_codecs import KINDS, assert_decoded_as_each_alone, build

MAX_TOKENS = 128  # what the server allows (tiny models' limit); headers may claim far more
SECONDS_PER_DECODE = 5.0  # generous on a loaded 2-core machine; a hang takes forever

QUICK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
LONG = settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _codecs() -> dict[str, Codec]:
    """Raw codecs, a small seeded codec of every learned kind, and every shipped checkpoint."""
    codecs: dict[str, Codec] = {name: make(name, 16) for name, make in BUILTIN_CODECS.items()}
    codecs.update({f"learned-{kind}": build(kind) for kind in KINDS})
    codecs["token-ids"] = TokenIdsCodec(1000)  # 10 bits per id, so most 10-bit patterns are out of range
    for entry in read_manifest():
        codecs[f"shipped-{entry.name}"] = load_checkpoint(entry, int(entry.config.get("width", 384)))
    return codecs


CODECS = _codecs()


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def valid_payload(codec: Codec, tokens: int = 6, seed: int = 0) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    if isinstance(codec, TokenIdsCodec):
        return codec.encode_payload(torch.randint(0, codec.vocab_size, (tokens, 1), generator=generator).float())
    return codec.encode_payload(torch.randn(tokens, codec.width, generator=generator) * 2.0)


@st.composite
def forged(draw: st.DrawFn, codec: Codec) -> bytes:
    """A header built field by field, often lying about the shape, followed by any body."""
    kind = draw(st.one_of(st.just(int(codec.kind)), st.integers(0, 31)))
    flags = draw(st.sampled_from([0, 0x40, 0x80, 0xC0, 0x20]))
    tokens = draw(st.one_of(st.integers(0, 8), st.integers(0, MAX_TOKENS + 2), st.integers(0, 2**35 - 1)))
    out = bytearray([0x51, flags | kind]) + varint(tokens)
    if flags & 0x40:
        out += varint(draw(st.one_of(st.just(codec.width), st.integers(0, 2**35 - 1))))
    if flags & 0x80:
        out += draw(st.binary(max_size=min(64, (tokens + 7) // 8 + 2)))
    body = draw(
        st.one_of(
            st.binary(max_size=512),
            st.just(bytes(valid_payload(codec)[3:])),
            st.integers(0, 4 * codec.width * 8).map(lambda n: bytes(n)),
        )
    )
    return bytes(out) + body


@st.composite
def mutated(draw: st.DrawFn, codec: Codec) -> bytes:
    """A valid payload, truncated, with bits flipped, or with junk appended."""
    payload = bytearray(valid_payload(codec, tokens=draw(st.integers(1, 12)), seed=draw(st.integers(0, 3))))
    how = draw(st.sampled_from(["truncate", "flip", "append", "flip-and-truncate"]))
    if how in ("flip", "flip-and-truncate"):
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(payload) - 1))
            payload[position] ^= 1 << draw(st.integers(0, 7))
    if how in ("truncate", "flip-and-truncate"):
        payload = payload[: draw(st.integers(0, len(payload) - 1))]
    if how == "append":
        payload += draw(st.binary(min_size=1, max_size=64))
    return bytes(payload)


def hostile(codec: Codec) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=2048), forged(codec), mutated(codec))


def check_decode(codec: Codec, payload: bytes) -> bool:
    """Decode ``payload``; True when it decoded, False when refused. Fails the test on anything else."""
    started = time.monotonic()
    try:
        header, hidden = codec.decode_payload(payload, max_tokens=MAX_TOKENS)
    except BitstreamError as exc:
        assert str(exc), "a refusal must say why"
        decoded = False
    else:
        assert 1 <= header.tokens <= MAX_TOKENS and header.width == codec.width
        assert hidden.dtype == torch.float32 and hidden.shape == (header.kept_tokens, codec.width)
        assert torch.isfinite(hidden).all()
        decoded = True
    assert time.monotonic() - started < SECONDS_PER_DECODE
    return decoded


def check_parse(payload: bytes, width: int) -> None:
    try:
        header, body = container.parse(payload, width, max_tokens=MAX_TOKENS, max_width=4096)
    except BitstreamError as exc:
        assert str(exc)
        return
    assert 1 <= header.tokens <= MAX_TOKENS and 1 <= header.width <= 4096
    assert 0 <= header.codec_kind <= 31
    if header.token_mask is not None:
        assert header.token_mask.shape == (header.tokens,) and header.token_mask.any()
    assert len(body) <= len(payload)


@pytest.fixture(params=sorted(CODECS))
def codec(request) -> Codec:
    return CODECS[request.param]


@QUICK
@given(payload=st.one_of(st.binary(max_size=300), forged(CODECS["fp16"])))
def test_parser_accepts_or_refuses_cleanly(payload: bytes) -> None:
    check_parse(payload, width=16)


def test_every_decoder_survives_hostile_payloads(codec: Codec) -> None:
    @QUICK
    @given(payload=hostile(codec))
    def run(payload: bytes) -> None:
        check_decode(codec, payload)

    run()


def check_batch(codec: Codec, payloads: list[bytes]) -> None:
    """The payloads that parse, decoded together as the server decodes a batch: each gets what it gets alone."""
    parsed = []
    for payload in payloads:
        try:
            parsed.append(codec.parse_payload(payload, max_tokens=MAX_TOKENS))
        except BitstreamError:
            continue
    assert_decoded_as_each_alone(codec, parsed)


def test_every_decoder_decodes_hostile_batches_as_each_payload_alone(codec: Codec) -> None:
    valid = [valid_payload(codec, tokens=n, seed=n) for n in (1, 9, 30)]

    @QUICK
    @given(payloads=st.lists(st.one_of(mutated(codec), st.sampled_from(valid)), min_size=2, max_size=6))
    def run(payloads: list[bytes]) -> None:
        check_batch(codec, payloads)

    run()


@pytest.mark.slow
@LONG
@given(payload=st.one_of(st.binary(max_size=4096), forged(CODECS["int8-zstd"])))
def test_parser_long_campaign(payload: bytes) -> None:
    check_parse(payload, width=16)


@pytest.mark.slow
def test_every_decoder_long_campaign(codec: Codec) -> None:
    @LONG
    @given(payload=hostile(codec))
    def run(payload: bytes) -> None:
        check_decode(codec, payload)

    run()


def test_headers_claiming_huge_shapes_are_refused_before_allocating(codec: Codec) -> None:
    """A header may claim 2**35 tokens; the parser refuses it with a few bytes allocated."""
    for tokens in (MAX_TOKENS + 1, 2**20, 2**35 - 1):
        for flags in (0x00, 0x80):
            payload = bytes([0x51, flags | int(codec.kind)]) + varint(tokens) + b"\xff" * 16
            tracemalloc.start()
            try:
                with pytest.raises(BitstreamError, match=f"claims {tokens} tokens"):
                    codec.decode_payload(payload, max_tokens=MAX_TOKENS)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 64 * 1024


def test_the_largest_allowed_claim_allocates_no_more_than_its_shape(codec: Codec) -> None:
    """A header claiming the most tokens allowed over a tiny body costs at most a few copies of that shape."""
    bound = 8 * MAX_TOKENS * codec.width * 8 + (1 << 20)  # eight int64/float64 copies, plus slack
    for body in (b"", b"\x01\x02\x03", bytes(range(256))):
        payload = bytes([0x51, int(codec.kind)]) + varint(MAX_TOKENS) + body
        tracemalloc.start()
        try:
            check_decode(codec, payload)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < bound


def test_mutations_are_mostly_caught_and_never_crash() -> None:
    """Across codecs, a seeded sweep of single-byte corruptions: every one refused or harmless."""
    rng = np.random.default_rng(0)
    refused = total = 0
    for codec in CODECS.values():
        payload = valid_payload(codec, tokens=5)
        for _ in range(20):
            bad = bytearray(payload)
            bad[int(rng.integers(0, len(bad)))] ^= int(rng.integers(1, 256))
            for candidate in (bytes(bad), bytes(bad[: int(rng.integers(0, len(bad)))])):
                total += 1
                refused += not check_decode(codec, candidate)
    assert refused > total // 3
