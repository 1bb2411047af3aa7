"""Choosing next tokens: greedy, or seeded sampling with temperature and top-p (nucleus).

::

    logits (B, V) --argmax---------------------------------------------> token ids (B,)   greedy
    logits (B, V) --/ temperature--> softmax --keep the top-p nucleus--> one seeded draw per sequence

This is the reference both split and unsplit generation use, so their choices can be compared token for
token. A sampler owns its random generator and draws exactly one uniform number per sequence per sampled
step, so a generation is reproducible from its seed alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one generation chooses its tokens and when it stops.

    ``temperature`` 0 is greedy (``top_p`` and ``seed`` are then unused). Generation stops after
    ``max_new_tokens`` tokens or after the first token in ``stop_tokens``, which is kept in the output.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_tokens: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be 0 or more, got {self.max_new_tokens}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.stop_tokens, frozenset):
            object.__setattr__(self, "stop_tokens", frozenset(int(token) for token in self.stop_tokens))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class TokenSampler:
    """Chooses the next token of each sequence under ``params``; one instance per generation."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._generator = torch.Generator().manual_seed(params.seed)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, V)`` -> chosen token ids ``(B,)`` (long)."""
        if logits.dim() != 2:
            raise ValueError(f"expected logits (B, V), got shape {tuple(logits.shape)}")
        if self.params.greedy:
            return logits.argmax(dim=-1)
        # float64 on the CPU: the same probabilities, and so the same choices, wherever the logits came from.
        probs = torch.softmax(logits.detach().to("cpu", torch.float64) / self.params.temperature, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        # The nucleus: the most likely tokens until their mass reaches top_p (always at least one).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.params.top_p
        cumulative = sorted_probs.masked_fill(outside, 0.0).cumsum(dim=-1)
        draw = torch.rand((logits.shape[0], 1), generator=self._generator, dtype=torch.float64)
        index = torch.searchsorted(cumulative, draw * cumulative[:, -1:], right=True)
        index = index.clamp(max=logits.shape[-1] - 1)
        return order.gather(-1, index).squeeze(-1).to(logits.device)


def generate(
    next_logits: Callable[[torch.Tensor], torch.Tensor], prompt_ids: Sequence[int], params: SamplingParams
) -> list[int]:
    """Reference generation loop for one sequence: the new token ids, stop token included.

    ``next_logits`` takes the token ids not yet seen ``(1, T)`` (the prompt first, then the one token
    chosen last) and returns the logits for the position after them ``(1, V)``: a stateful step with its
    own cache, split or not.
    """
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty: generation needs at least one token")
    sampler = TokenSampler(params)
    tokens: list[int] = []
    ids = torch.tensor([[int(token) for token in prompt_ids]], dtype=torch.long)
    while len(tokens) < params.max_new_tokens:
        token = int(sampler.choose(next_logits(ids))[0])
        tokens.append(token)
        if token in params.stop_tokens:
            break
        ids = torch.tensor([[token]], dtype=torch.long)
    return tokens
