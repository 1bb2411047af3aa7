"""Raw codecs: the hidden states as little-endian floats, and affine int8 per token + Zstandard."""

from __future__ import annotations

import numpy as np
import torch
import zstandard
from splitwire.codec.base import Codec, CodecKind
from splitwire.codec.errors import BitstreamError


def _expect_length(body: bytes | memoryview, expected: int, name: str) -> None:
    if len(body) != expected:
        raise BitstreamError(f"{name} body is {len(body)} bytes, expected {expected} for the declared shape")


class FloatCodec(Codec):
    """Each value as an IEEE float of ``dtype``; lossless for fp32."""

    _numpy_dtype: np.dtype

    def encode(self, hidden: torch.Tensor) -> bytes:
        return hidden.numpy().astype(self._numpy_dtype).tobytes()

    def decode(self, body: bytes | memoryview, tokens: int) -> torch.Tensor:
        _expect_length(body, tokens * self.width * self._numpy_dtype.itemsize, self.name)
        values = np.frombuffer(body, dtype=self._numpy_dtype).astype(np.float32)
        return torch.from_numpy(values.reshape(tokens, self.width))


class Fp32Codec(FloatCodec):
    kind = CodecKind.FP32
    lossless = True
    _numpy_dtype = np.dtype("<f4")


class Fp16Codec(FloatCodec):
    kind = CodecKind.FP16
    _numpy_dtype = np.dtype("<f2")


class Bf16Codec(Codec):
    """bfloat16: fp32's range with 8 bits of mantissa (round to nearest even)."""

    kind = CodecKind.BF16

    def encode(self, hidden: torch.Tensor) -> bytes:
        return hidden.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()

    def decode(self, body: bytes | memoryview, tokens: int) -> torch.Tensor:
        _expect_length(body, tokens * self.width * 2, self.name)
        bits = torch.from_numpy(np.frombuffer(body, dtype="<i2").astype(np.int16))
        return bits.view(torch.bfloat16).float().reshape(tokens, self.width)


class Int8ZstdCodec(Codec):
    """Affine int8 per token (offset and step as fp16), the whole body compressed with Zstandard.

    Body before compression: offsets ``(T,)`` fp16, steps ``(T,)`` fp16, codes ``(T, D)`` uint8.
    """

    kind = CodecKind.INT8_ZSTD
    level = 9

    def config(self) -> dict[str, object]:
        return {**super().config(), "zstd_level": self.level}

    def encode(self, hidden: torch.Tensor) -> bytes:
        x = hidden.numpy().astype(np.float32)
        lo = x.min(axis=1).astype(np.float16)
        step = ((x.max(axis=1) - lo.astype(np.float32)) / 255.0).astype(np.float16)
        # Quantise with the rounded offset and step the decoder will see.
        lo32, step32 = lo.astype(np.float32), step.astype(np.float32)
        safe_step = np.where(step32 > 0, step32, 1.0)
        codes = np.clip(np.rint((x - lo32[:, None]) / safe_step[:, None]), 0, 255).astype(np.uint8)
        raw = lo.astype("<f2").tobytes() + step.astype("<f2").tobytes() + codes.tobytes()
        return zstandard.ZstdCompressor(level=self.level).compress(raw)

    def decode(self, body: bytes | memoryview, tokens: int) -> torch.Tensor:
        expected = tokens * (4 + self.width)
        data = bytes(body)
        try:
            # A frame may declare its size; zstandard would trust it over max_output_size, so check first.
            declared = zstandard.frame_content_size(data)
            if declared not in (-1, expected):
                raise BitstreamError(f"{self.name} frame declares {declared} bytes, expected {expected}")
            raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=expected)
        except zstandard.ZstdError as exc:
            raise BitstreamError(f"{self.name} body is not a valid Zstandard frame: {exc}") from exc
        _expect_length(raw, expected, f"{self.name} decompressed")
        lo = np.frombuffer(raw, dtype="<f2", count=tokens).astype(np.float32)
        step = np.frombuffer(raw, dtype="<f2", count=tokens, offset=2 * tokens).astype(np.float32)
        codes = np.frombuffer(raw, dtype=np.uint8, offset=4 * tokens).reshape(tokens, self.width)
        return torch.from_numpy(lo[:, None] + codes.astype(np.float32) * step[:, None])
