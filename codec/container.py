"""The bitstream container: the only code that writes or reads payload headers.

Format, version 1 (all multi-byte integers are unsigned LEB128 varints)::

    offset  size      field
    0       1         0x5V: magic nibble 0x5, container version V in the low nibble
    1       1         flags (bit 7: token mask present; bit 6: width present; bit 5 reserved, zero)
                      | codec kind (bits 0-4, see CodecKind)
    2       varint    tokens T: tokens of the input before any token was dropped, >= 1
    .       varint    width D, only with flag bit 6: channels per token at the split, >= 1;
                      without it the width is the codec's own (the model's hidden size)
    .       ceil(T/8) token mask, only with flag bit 7: bit i (LSB first) set when token i was kept;
                      without it every token was kept. Unused high bits of the last byte are zero.
    .       rest      codec body: the kept tokens' hidden states, coded by the codec

A typical header is 3 bytes. Model and codec identity (fingerprints, checkpoint names) are settled
once per connection, not repeated here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from splitwire.codec.errors import BitstreamError

MAGIC_NIBBLE = 0x5
VERSION = 1
_FLAG_TOKEN_MASK = 0x80
_FLAG_WIDTH = 0x40
_RESERVED_FLAGS = 0x20
_KIND_BITS = 0x1F
_MAX_VARINT_BYTES = 5  # enough for 32-bit values

# Defaults for what a header may claim; servers pass their own, tighter limits.
DEFAULT_MAX_TOKENS = 65536
DEFAULT_MAX_WIDTH = 65536


@dataclass(frozen=True)
class Header:
    """What the container says about its body."""

    codec_kind: int
    tokens: int
    width: int
    token_mask: np.ndarray | None = None  # (tokens,) bool, None when every token was kept
    explicit_width: bool = False  # write the width even though the codec implies it

    @property
    def kept_tokens(self) -> int:
        return self.tokens if self.token_mask is None else int(self.token_mask.sum())

    def kept_mask(self) -> np.ndarray:
        """``(tokens,)`` bool: which input tokens the body holds."""
        return np.ones(self.tokens, dtype=bool) if self.token_mask is None else self.token_mask


def write_varint(value: int, out: bytearray) -> None:
    """Append ``value`` as an unsigned LEB128 varint."""
    if value < 0:
        raise ValueError(f"varint must be non-negative, got {value}")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def read_varint(data: memoryview, offset: int, field: str, part: str = "header") -> tuple[int, int]:
    """The varint at ``offset`` and the offset after it; ``field`` and ``part`` name it in errors."""
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if offset + i >= len(data):
            raise BitstreamError(f"truncated {part}: {field} ends after {len(data)} bytes")
        byte = data[offset + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if i and byte == 0:
                raise BitstreamError(f"non-canonical varint in {field}")
            return value, offset + i + 1
    raise BitstreamError(f"{field} is longer than {_MAX_VARINT_BYTES} bytes")


def pack(header: Header, body: bytes) -> bytes:
    """Header + body -> payload bytes. The width is written only when ``header.explicit_width``."""
    if not 0 <= header.codec_kind <= _KIND_BITS:
        raise ValueError(f"codec kind {header.codec_kind} does not fit the header")
    if header.tokens < 1 or header.width < 1:
        raise ValueError(f"a payload needs at least one token and one channel, got {header.tokens}x{header.width}")
    out = bytearray([(MAGIC_NIBBLE << 4) | VERSION])
    flags = (_FLAG_TOKEN_MASK if header.token_mask is not None else 0) | (_FLAG_WIDTH if header.explicit_width else 0)
    out.append(flags | header.codec_kind)
    write_varint(header.tokens, out)
    if header.explicit_width:
        write_varint(header.width, out)
    if header.token_mask is not None:
        mask = np.asarray(header.token_mask, dtype=bool)
        if mask.shape != (header.tokens,):
            raise ValueError(f"token mask has shape {mask.shape}, expected ({header.tokens},)")
        out += np.packbits(mask, bitorder="little").tobytes()
    out += body
    return bytes(out)


def parse(
    payload: bytes,
    width: int,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_width: int = DEFAULT_MAX_WIDTH,
) -> tuple[Header, memoryview]:
    """Payload bytes -> (header, body). Raises :class:`BitstreamError` on anything malformed.

    ``width`` is the codec's width, used when the payload does not state one. Limits are checked
    before anything is allocated, so a header cannot make the reader allocate more than
    ``max_tokens`` bits of mask.
    """
    data = memoryview(payload)
    if len(data) < 2:
        raise BitstreamError(f"payload of {len(data)} bytes is shorter than the 2-byte container prefix")
    if data[0] >> 4 != MAGIC_NIBBLE:
        raise BitstreamError(f"not a splitwire payload: first byte is 0x{data[0]:02x}, expected 0x{MAGIC_NIBBLE:x}?")
    version = data[0] & 0x0F
    if version != VERSION:
        raise BitstreamError(f"container version {version} is not supported; this build reads version {VERSION}")
    flags = data[1]
    if flags & _RESERVED_FLAGS:
        raise BitstreamError(f"reserved header flags are set (0x{flags:02x})")
    kind = flags & _KIND_BITS
    tokens, offset = read_varint(data, 2, "token count")
    if not 1 <= tokens <= max_tokens:
        raise BitstreamError(f"header claims {tokens} tokens; allowed are 1 to {max_tokens}")
    if flags & _FLAG_WIDTH:
        width, offset = read_varint(data, offset, "width")
        if not 1 <= width <= max_width:
            raise BitstreamError(f"header claims width {width}; allowed are 1 to {max_width}")
    mask = None
    if flags & _FLAG_TOKEN_MASK:
        mask_bytes = (tokens + 7) // 8
        if offset + mask_bytes > len(data):
            raise BitstreamError(f"truncated token mask: needs {mask_bytes} bytes, {len(data) - offset} left")
        bits = np.frombuffer(data[offset : offset + mask_bytes], dtype=np.uint8)
        unpacked = np.unpackbits(bits, bitorder="little").astype(bool)
        if unpacked[tokens:].any():
            raise BitstreamError("token mask has bits set past the last token")
        mask = unpacked[:tokens]
        if not mask.any():
            raise BitstreamError("token mask keeps no token")
        offset += mask_bytes
    header = Header(
        codec_kind=kind, tokens=tokens, width=width, token_mask=mask, explicit_width=bool(flags & _FLAG_WIDTH)
    )
    return header, data[offset:]


def bits_per_token(payload_bytes: int, tokens: int) -> float:
    """The rate every figure reports: whole payload (header included) x 8 / input tokens before dropping."""
    return payload_bytes * 8.0 / max(tokens, 1)
