"""Generation sessions: the back half's KV cache and the sampler of one stream.

::

    prefill: prompt hidden (T, D) --back_step: blocks [k, L) + head, cache += T--> logits (1, V) --sampler--> token
    step:    token hidden  (1, D) --back_step: blocks [k, L) + head, cache += 1--> logits (1, V) --sampler--> token
             ... until a stop token or max_new_tokens, then the cache is freed

Sampling happens here, on the server, because the server has the logits: the answer to a step is one
token id and its log-probability, and the session is reproducible from its seed (the sampler draws
from its own generator; see :mod:`splitwire.split.sampling`). A session belongs to one stream, which
sends its steps one at a time; its cache lives until :meth:`GenerationSession.close`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from splitwire.codec.base import Codec
from splitwire.codec.container import Header
from splitwire.split.cut import Cut, DecoderCache, SplitModel
from splitwire.split.sampling import SamplingParams, TokenSampler


class FinishReason(enum.Enum):
    """Why a generation ended; the values label ``splitwire_cloud_generation_sessions_ended_total``."""

    STOP_TOKEN = "stop_token"
    MAX_NEW_TOKENS = "max_new_tokens"


class SessionStateError(ValueError):
    """A payload that does not fit where the session stands (wrong token count, dropped tokens, too long)."""


@dataclass(frozen=True)
class GeneratedToken:
    """One step's answer."""

    token_id: int
    logprob: float  # natural log of softmax(logits) at the token, before temperature or top-p
    finish: FinishReason | None  # set on the last token of the session


class GenerationSession:
    """One stream's generation: back-half cache, sampler and progress. Not thread-safe: one step at a time."""

    def __init__(
        self, split_model: SplitModel, cut: Cut, codec: Codec, params: SamplingParams, max_positions: int
    ) -> None:
        self.cut = cut
        self.codec = codec
        self.params = params
        self.max_positions = max_positions
        self.generated = 0
        self.finished: FinishReason | None = None
        self._split_model = split_model
        self._sampler = TokenSampler(params)
        self._cache: DecoderCache | None = split_model.new_cache(cut.back)
        # What the codec carries from one of the stream's payloads to the next (the edge keeps its own).
        self.carry = codec.new_carry()

    @property
    def prefilled(self) -> bool:
        return self.generated > 0

    @property
    def closed(self) -> bool:
        return self._cache is None

    def check(self, header: Header) -> None:
        """Refuse a payload that does not fit this point of the session (before running anything)."""
        if header.token_mask is not None and not header.token_mask.all():
            raise SessionStateError(
                "generation payloads must carry every token: the back half's cache needs each position "
                "(use a codec without token dropping)"
            )
        if self.prefilled and header.tokens != 1:
            raise SessionStateError(
                f"a generation step carries the hidden state of exactly 1 token (the one chosen last), "
                f"this payload has {header.tokens}"
            )
        if not self.prefilled and header.tokens + self.params.max_new_tokens > self.max_positions:
            raise SessionStateError(
                f"the prompt's {header.tokens} tokens plus max_new_tokens {self.params.max_new_tokens} exceed "
                f"the {self.max_positions} positions a session may hold; shorten the prompt or ask for fewer tokens"
            )

    def advance(self, hidden: torch.Tensor) -> GeneratedToken:
        """Hidden states at the split ``(T, D)`` (the prompt, then one token) -> the next token.

        Runs the back half on the compute thread. Raises :class:`SessionStateError` once the session
        has finished or been closed.
        """
        cache = self._cache
        if cache is None or self.finished is not None:
            raise SessionStateError("the generation session has ended; open a new stream to generate again")
        with torch.inference_mode():
            logits = self._split_model.back_step(cache, hidden.unsqueeze(0))
            token = int(self._sampler.choose(logits)[0])
            logprob = float(torch.log_softmax(logits[0].float(), dim=-1)[token])
        self.generated += 1
        if token in self.params.stop_tokens:
            self.finished = FinishReason.STOP_TOKEN
        elif self.generated >= self.params.max_new_tokens:
            self.finished = FinishReason.MAX_NEW_TOKENS
        return GeneratedToken(token, logprob, self.finished)

    @property
    def positions(self) -> int:
        """Positions the back cache holds (0 once closed)."""
        return self._cache.length if self._cache is not None else 0

    def close(self) -> None:
        """Free the cache. A step still running keeps its own reference until it returns."""
        self._cache = None
