"""The token ids themselves: what a client sends when the whole model runs in the cloud.

Not a compression of hidden states but the baseline every split is compared with: at split 0 the edge
runs nothing and sends the ``T`` input token ids, each in ``ceil(log2 vocab)`` bits (15 for MiniLM's
30,522 word pieces, 16 for SmolLM2's 49,152), packed LSB first; the cloud embeds them and runs every block.

The codec codes ``(T, 1)`` float32 columns of ids (exact below 2**24) so that it fits the container and
the catalog like any other codec; ``Codec.codes_token_ids`` tells edge and cloud to treat it so.
"""

from __future__ import annotations

import numpy as np
import torch
from splitwire.codec.base import Codec, CodecKind
from splitwire.codec.errors import BitstreamError

TOKEN_IDS_CODEC = "token-ids"
_MAX_VOCAB = 1 << 24  # float32 holds every integer below this exactly


class TokenIdsCodec(Codec):
    kind = CodecKind.TOKEN_IDS
    lossless = True
    codes_token_ids = True

    def __init__(self, vocab_size: int) -> None:
        if not 2 <= vocab_size <= _MAX_VOCAB:
            raise ValueError(f"vocabulary of {vocab_size} ids: token-ids codes 2 to {_MAX_VOCAB}")
        super().__init__(TOKEN_IDS_CODEC, width=1, splits=(0,))
        self.vocab_size = vocab_size
        self.bits = (vocab_size - 1).bit_length()
        self.expected_bits_per_token = float(self.bits)

    def config(self) -> dict[str, object]:
        return {**super().config(), "vocab_size": self.vocab_size}

    def encode(self, hidden: torch.Tensor) -> bytes:
        ids = hidden.reshape(-1).to(torch.int64).numpy()
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        shifts = np.arange(self.bits, dtype=np.uint32)
        bits = ((ids.astype(np.uint32)[:, None] >> shifts) & 1).astype(np.uint8)
        return np.packbits(bits.reshape(-1), bitorder="little").tobytes()

    def decode(self, body: bytes | memoryview, tokens: int) -> torch.Tensor:
        expected = (tokens * self.bits + 7) // 8
        if len(body) != expected:
            raise BitstreamError(f"{self.name} body is {len(body)} bytes, expected {expected} for {tokens} tokens")
        bits = np.unpackbits(np.frombuffer(body, dtype=np.uint8), bitorder="little")
        if bits[tokens * self.bits :].any():
            raise BitstreamError(f"{self.name} body has bits set past the last token")
        weights = np.uint32(1) << np.arange(self.bits, dtype=np.uint32)
        ids = (bits[: tokens * self.bits].reshape(tokens, self.bits).astype(np.uint32) * weights).sum(axis=1)
        if ids.size and int(ids.max()) >= self.vocab_size:
            raise BitstreamError(
                f"{self.name} body holds id {int(ids.max())}, past the vocabulary of {self.vocab_size}"
            )
        return torch.from_numpy(ids.astype(np.float32)).reshape(tokens, 1)
