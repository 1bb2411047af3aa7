"""Raw codecs: exact bytes for a seeded input, round trips, and malformed bodies."""

from __future__ import annotations

import hashlib

import pytest
import torch
import zstandard
from splitwire.codec.base import CodecKind
from splitwire.codec.catalog import BUILTIN_CODECS, CodecCatalog
from splitwire.codec.errors import BitstreamError, UnknownCodecError
from splitwire.codec.token_ids import TokenIdsCodec

WIDTH = 16


def seeded_hidden(tokens: int = 5, width: int = WIDTH) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(tokens, width, generator=generator) * 3.0


# sha256 of the payloads for seeded_hidden(); a change here breaks every deployed peer.
GOLDEN = {
    "fp32": "05333ed161d58a12",
    "fp16": "55b10546e9ba1615",
    "bf16": "9dabb560bf03f619",
    "int8-zstd": "230a987a2e06a892",
}


def payload_of(name: str) -> bytes:
    return BUILTIN_CODECS[name](name, WIDTH).encode_payload(seeded_hidden())


@pytest.mark.parametrize("name", sorted(BUILTIN_CODECS))
def test_golden_payload_hash(name: str) -> None:
    assert hashlib.sha256(payload_of(name)).hexdigest()[:16] == GOLDEN[name]


@pytest.mark.parametrize(("name", "tolerance"), [("fp32", 0.0), ("fp16", 2e-3), ("bf16", 2e-2), ("int8-zstd", 0.05)])
def test_round_trip_error(name: str, tolerance: float) -> None:
    codec = BUILTIN_CODECS[name](name, WIDTH)
    hidden = seeded_hidden()
    header, decoded = codec.decode_payload(codec.encode_payload(hidden))
    assert header.tokens == 5 and header.codec_kind == codec.kind
    assert decoded.shape == hidden.shape and decoded.dtype == torch.float32
    scale = hidden.abs().max().item()
    assert (decoded - hidden).abs().max().item() <= tolerance * scale


def test_raw_sizes_are_exact() -> None:
    assert len(payload_of("fp32")) == 3 + 5 * WIDTH * 4
    assert len(payload_of("fp16")) == 3 + 5 * WIDTH * 2
    assert len(payload_of("bf16")) == 3 + 5 * WIDTH * 2


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16"])
def test_float_body_of_wrong_length_is_rejected(name: str) -> None:
    payload = payload_of(name)
    with pytest.raises(BitstreamError, match="expected"):
        BUILTIN_CODECS[name](name, WIDTH).decode_payload(payload[:-1])


def test_non_finite_values_are_rejected() -> None:
    codec = BUILTIN_CODECS["fp32"]("fp32", WIDTH)
    hidden = seeded_hidden()
    hidden[0, 0] = float("nan")
    with pytest.raises(BitstreamError, match="non-finite"):
        codec.decode_payload(codec.encode_payload(hidden))


def test_int8_zstd_rejects_garbage_and_frames_claiming_more_than_the_shape() -> None:
    codec = BUILTIN_CODECS["int8-zstd"]("int8-zstd", WIDTH)
    header = payload_of("int8-zstd")[:3]
    with pytest.raises(BitstreamError, match="Zstandard"):
        codec.decode_payload(header + b"not zstd at all")
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 50_000_000)
    with pytest.raises(BitstreamError, match="declares 50000000 bytes"):
        codec.decode_payload(header + bomb)


def test_payload_of_another_codec_is_rejected() -> None:
    with pytest.raises(BitstreamError, match="coded with fp16, but the request names fp32"):
        BUILTIN_CODECS["fp32"]("fp32", WIDTH).decode_payload(payload_of("fp16"))


def test_payload_of_another_width_is_rejected() -> None:
    with pytest.raises(BitstreamError, match="expected 320 for the declared shape"):
        BUILTIN_CODECS["fp16"]("fp16", WIDTH * 2).decode_payload(payload_of("fp16"))


def test_catalog_lists_builtins_and_refuses_unknown_names() -> None:
    catalog = CodecCatalog.for_model("no-checkpoints-for-this", WIDTH)
    assert catalog.names()[:4] == ["fp32", "fp16", "bf16", "int8-zstd"]
    assert catalog.get(None).name == catalog.default
    with pytest.raises(UnknownCodecError, match="unknown codec 'nope'; available: fp32"):
        catalog.get("nope")


def test_codec_kind_ids_never_change() -> None:
    assert {kind.label: int(kind) for kind in CodecKind} == {
        "fp32": 1, "fp16": 2, "bf16": 3, "int8-zstd": 4, "uniform": 5, "pca": 6, "factorized": 7, "hyperprior": 8,
        "token-ids": 9,
    }  # fmt: skip


def test_token_ids_round_trip_in_ceil_log2_vocab_bits() -> None:
    codec = TokenIdsCodec(30522)
    ids = torch.tensor([101, 2023, 30521, 0, 7592, 102], dtype=torch.float32)[:, None]
    payload = codec.encode_payload(ids)
    assert len(payload) == 3 + (6 * 15 + 7) // 8  # header, then 15 bits an id
    header, decoded = codec.decode_payload(payload)
    assert header.tokens == 6 and torch.equal(decoded, ids)
    assert codec.valid_at(0) and not codec.valid_at(1)


def test_token_ids_refuse_ids_past_the_vocabulary_and_stray_bits() -> None:
    codec = TokenIdsCodec(1000)  # 10 bits an id: 1023 is a valid pattern but not a valid id
    header = bytes([0x51, int(CodecKind.TOKEN_IDS), 1])
    with pytest.raises(BitstreamError, match="id 1023, past the vocabulary of 1000"):
        codec.decode_payload(header + bytes([0xFF, 0x03]))
    with pytest.raises(BitstreamError, match="bits set past the last token"):
        codec.decode_payload(header + bytes([0x01, 0x04]))
    with pytest.raises(BitstreamError, match="is 3 bytes, expected 2"):
        codec.decode_payload(header + bytes(3))
    with pytest.raises(ValueError, match="token ids must lie in"):
        codec.encode_payload(torch.tensor([[1000.0]]))


def test_catalog_offers_token_ids_only_when_told_the_vocabulary() -> None:
    assert "token-ids" not in CodecCatalog.for_model("m", WIDTH).names()
    catalog = CodecCatalog.for_model("m", WIDTH, vocab_size=30522)
    assert catalog.names(0)[-1] == "token-ids" and "token-ids" not in catalog.names(1)
