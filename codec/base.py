"""The codec interface: hidden states at the split <-> codec body, wrapped in the container.

::

    hidden (T, D) --encode--> body --container.pack--> payload --wire-->
    payload --container.parse--> header, body --decode--> hidden (T, D)

A codec instance is bound to one model width and knows which split points it is valid for.

Payloads stand alone, except in a stream that both peers code in order (a generation's prompt, then
its steps): there a codec may carry state from one payload to the next (:meth:`Codec.new_carry`).
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from splitwire.codec import container
from splitwire.codec.errors import BitstreamError, each_or_error
from splitwire.split.fingerprint import tensors_fingerprint


def checked_finite(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden``, after checking a decoder made no NaN or infinity of a payload; BitstreamError if it did."""
    # One float64 sum finds any NaN or infinity (they propagate; finite float32 values cannot overflow
    # it) at a fraction of the cost of an elementwise test.
    if not math.isfinite(hidden.sum(dtype=torch.float64).item()):
        raise BitstreamError("payload decodes to non-finite values")
    return hidden


class CodecKind(enum.IntEnum):
    """Codec families; the value is the id written in the container header and must never change."""

    FP32 = 1
    FP16 = 2
    BF16 = 3
    INT8_ZSTD = 4
    UNIFORM = 5
    PCA = 6
    FACTORIZED = 7
    HYPERPRIOR = 8
    TOKEN_IDS = 9

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


class Codec(ABC):
    """Codes the hidden states of one sequence's kept tokens, ``(T, D)`` float32."""

    kind: ClassVar[CodecKind]
    lossless: ClassVar[bool] = False
    # True for the one codec that codes the input's token ids ``(T, 1)`` at split 0 instead of hidden
    # states: the edge runs nothing and the cloud embeds the ids before the blocks.
    codes_token_ids: ClassVar[bool] = False

    def __init__(self, name: str, width: int, splits: tuple[int, ...] = ()) -> None:
        self.name = name
        self.width = width
        self.splits = splits  # empty: valid at every split point
        self.expected_bits_per_token: float | None = None
        # Low-rank corrections of the front blocks this codec was trained with (see splitwire.split.adapter):
        # the edge runs its front with them merged in; the cloud needs nothing of them.
        self.front_adapter: dict[str, torch.Tensor] | None = None

    # -- the two operations every codec implements -------------------------------------------

    @abstractmethod
    def encode(self, hidden: torch.Tensor) -> bytes:
        """``(T, D)`` float32 -> codec body."""

    @abstractmethod
    def decode(self, body: bytes | memoryview, tokens: int) -> torch.Tensor:
        """Codec body of ``tokens`` kept tokens -> ``(tokens, D)`` float32.

        Raises :class:`BitstreamError` when the body is malformed; never allocates more than the
        declared shape.
        """

    # -- streams ----------------------------------------------------------------------------

    def new_carry(self) -> object | None:
        """What this codec carries from one payload of an ordered stream to the next, fresh for a new
        stream; the encoder and the decoder each keep one and pass it with every payload of the stream,
        in order. None (the default): every payload stands alone."""
        return None

    def encode_carried(self, hidden: torch.Tensor, carry: object) -> bytes:
        """:meth:`encode`, for the next payload of the stream ``carry`` belongs to (updating it)."""
        return self.encode(hidden)

    def decode_carried(self, body: bytes | memoryview, tokens: int, carry: object) -> torch.Tensor:
        """:meth:`decode`, for the next payload of the stream ``carry`` belongs to (updated only when the
        body decodes)."""
        return self.decode(body, tokens)

    # -- identity ---------------------------------------------------------------------------

    def config(self) -> dict[str, object]:
        """What, beside parameters, changes the bits; part of the fingerprint."""
        return {"kind": self.kind.label, "width": self.width}

    def parameters_for_fingerprint(self) -> list[tuple[str, torch.Tensor]]:
        return []

    def fingerprint(self) -> str:
        return tensors_fingerprint(self.config(), self.parameters_for_fingerprint())

    def valid_at(self, split: int) -> bool:
        return not self.splits or split in self.splits

    # -- rate accounting --------------------------------------------------------------------

    def estimate_bits(self, hidden: torch.Tensor) -> float:
        """Ideal code length of ``hidden`` under the codec's model (-log2 likelihood); real bits by default."""
        return 8.0 * len(self.encode(hidden))

    def warm_up(self) -> None:
        """Do now the one-time set-up the first encode and decode would otherwise pay for: one round trip.

        Learned codecs build their coding tables and tensor programs on first use, and PyTorch sets up
        each operator on its first call: a few milliseconds the first request need not wait for.
        """
        self.decode_payload(self.encode_sequence(torch.zeros(4, self.width)))

    def select_tokens(self, hidden: torch.Tensor) -> np.ndarray | None:
        """Which of ``(T, D)``'s tokens to send, ``(T,)`` bool; None (the default) sends all of them."""
        return None

    # -- container ----------------------------------------------------------------------------

    def encode_sequence(self, hidden: torch.Tensor) -> bytes:
        """A whole sequence's hidden states ``(T, D)`` -> payload, dropping tokens the codec selects out."""
        keep = self.select_tokens(hidden)
        if keep is None or keep.all():
            return self.encode_payload(hidden)
        return self.encode_payload(hidden[torch.from_numpy(keep)], token_mask=keep)

    def encode_payload(
        self, hidden: torch.Tensor, token_mask: np.ndarray | None = None, carry: object | None = None
    ) -> bytes:
        """Hidden states of kept tokens ``(T_kept, D)`` -> payload with header.

        ``token_mask`` ``(T,)`` bool marks which input tokens were kept; None when all were. ``carry``:
        the stream's (:meth:`new_carry`), for a payload of an ordered stream.
        """
        if hidden.ndim != 2 or hidden.shape[1] != self.width:
            raise ValueError(f"{self.name} codes (tokens, {self.width}) tensors, got {tuple(hidden.shape)}")
        tokens = hidden.shape[0] if token_mask is None else len(token_mask)
        if token_mask is not None and int(np.count_nonzero(token_mask)) != hidden.shape[0]:
            raise ValueError("token mask and hidden states disagree on the number of kept tokens")
        header = container.Header(int(self.kind), tokens, self.width, token_mask)
        hidden = hidden.detach().float().contiguous()
        return container.pack(header, self.encode(hidden) if carry is None else self.encode_carried(hidden, carry))

    def decode_payload(
        self, payload: bytes, max_tokens: int = container.DEFAULT_MAX_TOKENS
    ) -> tuple[container.Header, torch.Tensor]:
        """Payload -> (header, hidden states of the kept tokens ``(T_kept, D)``)."""
        header, body = self.parse_payload(payload, max_tokens)
        return header, self.decode_body(header, body)

    def parse_payload(
        self, payload: bytes, max_tokens: int = container.DEFAULT_MAX_TOKENS
    ) -> tuple[container.Header, memoryview]:
        """The cheap half of :meth:`decode_payload`: the header, checked against this codec, and the body."""
        header, body = container.parse(payload, self.width, max_tokens=max_tokens, max_width=self.width)
        if header.codec_kind != self.kind:
            try:
                claimed = CodecKind(header.codec_kind).label
            except ValueError:
                claimed = f"unknown kind {header.codec_kind}"
            raise BitstreamError(f"payload was coded with {claimed}, but the request names {self.name}")
        if header.width != self.width:
            raise BitstreamError(f"payload width {header.width} does not match the model width {self.width}")
        return header, body

    def decode_body(
        self, header: container.Header, body: bytes | memoryview, carry: object | None = None
    ) -> torch.Tensor:
        """The costly half of :meth:`decode_payload`: the body of a parsed payload -> ``(T_kept, D)``;
        ``carry`` as for :meth:`encode_payload`."""
        tokens = header.kept_tokens
        return self.checked_output(
            self.decode(body, tokens) if carry is None else self.decode_carried(body, tokens, carry)
        )

    def checked_output(self, hidden: torch.Tensor) -> torch.Tensor:
        """What a decoder made of a body, checked for NaN and infinity unless this codec cannot make them."""
        return hidden if self.decodes_only_finite() else checked_finite(hidden)

    def decodes_only_finite(self) -> bool:
        """True when no body can decode to NaN or infinity (proven from the codec's own bounds), so the
        output check, a cold reduction on the decoding path, can be left out."""
        return False

    def decode_bodies(
        self, parsed: Sequence[tuple[container.Header, bytes | memoryview]]
    ) -> list[torch.Tensor | BitstreamError]:
        """:meth:`decode_body` for several parsed payloads, each result in its place: the hidden states, or
        the BitstreamError of a payload that does not decode (it fails alone). Codecs whose transforms
        can run over every payload's tokens at once override this; by default, one at a time."""
        return each_or_error(self.decode_body, parsed)
