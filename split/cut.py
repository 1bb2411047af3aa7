"""The one model cutter: front = embeddings + blocks [0, k), back = blocks [k, L) + head.

::

    token ids (B, T) --embed--> (B, T, D) --blocks [0, k)--> hidden at the split (B, T, D)
                                                                 |  codec + wire
    answer <--head-- (B, T, D) <--blocks [k, L)------------------+

Both halves run the Hugging Face model's own modules; nothing is forked. Attention masks and
positions are rebuilt on each side from the boolean token mask, so 4-D masks and rotary tables never
cross the wire. Callers choose gradient mode: serving wraps calls in ``torch.inference_mode()``,
codec training lets gradients flow through the frozen back half.

Generation (decoders) keeps one :class:`DecoderCache` per side, each holding the keys and values of its
own blocks and counting the positions it has seen::

    prefill: prompt ids (B, T)  --front_step--> (B, T, D) --wire--> back_step --> next-token logits (B, V)
    decode:  new token  (B, 1)  --front_step--> (B, 1, D) --wire--> back_step --> next-token logits (B, V)
             front cache: blocks [0, k)                            back cache: blocks [k, L)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from splitwire.split.adapter import merged_front, trainable_front
from splitwire.split.models import LoadedModel, ModelFamily
from torch import nn
from transformers import DynamicCache


class InvalidSplitError(ValueError):
    """A split point outside ``[0, num_blocks]``."""


@dataclass(frozen=True)
class BlockRange:
    """Half-open range ``[start, end)`` of transformer blocks."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise InvalidSplitError(f"invalid block range [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Cut:
    """Where a model of ``num_blocks`` blocks is split: the edge runs ``front``, the cloud ``back``."""

    num_blocks: int
    split: int

    def __post_init__(self) -> None:
        if not 0 <= self.split <= self.num_blocks:
            raise InvalidSplitError(
                f"split {self.split} is outside [0, {self.num_blocks}] for a model of {self.num_blocks} blocks"
            )

    @property
    def front(self) -> BlockRange:
        return BlockRange(0, self.split)

    @property
    def back(self) -> BlockRange:
        return BlockRange(self.split, self.num_blocks)

    # The only conversion between a cut and the wire: InferRequest.split is the first block the
    # server runs, absent meaning the model's default.
    def to_wire(self) -> int:
        return self.split

    @classmethod
    def from_wire(cls, model: LoadedModel, split: int | None) -> Cut:
        return cls(model.num_blocks, model.spec.default_split if split is None else int(split))


DROPPED_TOKEN_BIAS = 20.0


def positions_from_mask(token_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token, counting only real tokens: ``(B, T)`` bool -> ``(B, T)`` long."""
    return (token_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def attention_bias(
    token_mask: torch.Tensor,
    positions: torch.Tensor,
    causal: bool,
    dtype: torch.dtype,
    token_weights: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive attention mask: 0 where a query may attend a key, the dtype's minimum elsewhere.

    Bidirectional: ``(B, 1, 1, T)``, keys masked by ``token_mask``. Causal: ``(B, 1, T, T)``, a query
    also sees only keys at positions not after its own. ``token_weights`` ``(B, T)`` in [0, 1] are the
    differentiable form of dropping tokens, used in training with straight-through 0/1 gates: weight 0
    lowers a key's logit by ``DROPPED_TOKEN_BIAS`` (it gets ~e^-20 of the attention), 1 leaves it alone.
    ``query_positions`` ``(B, Q)``: positions of the queries when they are not the keys (decoding with a
    cache: the keys are the cached tokens and the new ones); the causal mask is then ``(B, 1, Q, T)``.
    """
    if query_positions is None:
        query_positions = positions
    allowed = token_mask[:, None, None, :]
    if causal:
        allowed = allowed & (positions[:, None, None, :] <= query_positions[:, None, :, None])
    bias = torch.zeros(allowed.shape, dtype=dtype, device=token_mask.device)
    if token_weights is not None:
        bias = bias + ((token_weights - 1.0) * DROPPED_TOKEN_BIAS).to(dtype)[:, None, None, :]
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


@dataclass(eq=False)
class DecoderCache:
    """One side's generation state: keys and values of ``blocks`` for a batch of sequences.

    ``length`` counts the positions every sequence has seen, also on a side with no blocks (its
    rotary positions and causal masks start there). Sequences of a batch advance together: no padding.
    Made by :meth:`SplitModel.new_cache`; used by one session at a time.
    """

    blocks: BlockRange
    kv: DynamicCache = field(repr=False)
    length: int = 0


class SplitModel:
    """Runs any block range of a loaded model, and its embeddings and head."""

    def __init__(self, model: LoadedModel, layers: nn.ModuleList | None = None) -> None:
        """``layers``: blocks to run instead of the model's own (see :meth:`with_front_adapter`)."""
        self.model = model
        self.causal = model.family is ModelFamily.DECODER
        self._adapted: dict[int, tuple[Mapping[str, torch.Tensor], SplitModel]] = {}
        hf = model.hf_model
        if self.causal:
            self._embed_tokens = hf.model.embed_tokens
            self._layers = hf.model.layers if layers is None else layers
            self._rotary = hf.model.rotary_emb
            self._final_norm = hf.model.norm
            self._lm_head = hf.lm_head
        else:
            self._embeddings = hf.embeddings
            self._layers = hf.encoder.layer if layers is None else layers

    def with_front_adapter(self, adapter: Mapping[str, torch.Tensor] | None) -> SplitModel:
        """This model with a codec's front adapter merged into its front blocks (see
        :mod:`splitwire.split.adapter`); itself when ``adapter`` is None. Built once per adapter."""
        if adapter is None:
            return self
        self._refuse_encoder()
        if id(adapter) not in self._adapted:
            self._adapted[id(adapter)] = (adapter, SplitModel(self.model, merged_front(self._layers, adapter)))
        return self._adapted[id(adapter)][1]

    def with_trainable_front(self, blocks: int, rank: int) -> tuple[SplitModel, dict[str, nn.Parameter]]:
        """This model with a fresh rank-``rank`` adapter on its first ``blocks`` (the identity until
        trained), and the adapter's parameters by key: what codec training learns the front adapter with."""
        self._refuse_encoder()
        layers, parameters = trainable_front(self._layers, blocks, rank)
        return SplitModel(self.model, layers), parameters

    def _refuse_encoder(self) -> None:
        if not self.causal:  # the adapted linears are a Llama block's
            raise ValueError(f"front adapters correct decoder blocks; {self.model.name} is an encoder")

    def embed(self, input_ids: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, T)`` -> input of block 0 ``(B, T, D)``."""
        if self.causal:
            return self._embed_tokens(input_ids)
        return self._embeddings(
            input_ids=input_ids,
            token_type_ids=torch.zeros_like(input_ids),
            position_ids=positions_from_mask(token_mask),
        )

    def blocks(
        self,
        hidden: torch.Tensor,
        token_mask: torch.Tensor,
        blocks: BlockRange,
        positions: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``blocks`` on ``hidden`` ``(B, T, D)``; padding is where ``token_mask`` ``(B, T)`` is False.

        ``positions`` ``(B, T)`` defaults to the rank of each token among the real ones; pass the original
        positions when tokens were dropped before the split. ``token_weights``: see :func:`attention_bias`.
        """
        if blocks.end > len(self._layers):
            raise InvalidSplitError(f"block range [{blocks.start}, {blocks.end}) exceeds {len(self._layers)} blocks")
        if len(blocks) == 0:
            return hidden
        if positions is None:
            positions = positions_from_mask(token_mask)
        bias = attention_bias(token_mask, positions, self.causal, hidden.dtype, token_weights)
        kwargs = {}
        if self.causal:
            kwargs = {"position_ids": positions, "position_embeddings": self._rotary(hidden, positions)}
        for layer in self._layers[blocks.start : blocks.end]:
            hidden = layer(hidden, attention_mask=bias, **kwargs)
        return hidden

    def new_cache(self, blocks: BlockRange) -> DecoderCache:
        """An empty generation cache for one side's ``blocks`` (``cut.front`` or ``cut.back``)."""
        if not self.causal:
            raise InvalidSplitError(f"{self.model.name} is an encoder: only decoders generate")
        if blocks.end > len(self._layers):
            raise InvalidSplitError(f"block range [{blocks.start}, {blocks.end}) exceeds {len(self._layers)} blocks")
        return DecoderCache(blocks, DynamicCache(config=self.model.hf_model.config))

    def _cached_blocks(self, hidden: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """Run ``cache.blocks`` on the next ``T`` positions ``(B, T, D)``, attending to the cached ones too.

        Appends the new keys and values to ``cache`` and advances ``cache.length`` by ``T``.
        """
        if hidden.dim() != 3 or hidden.shape[1] == 0:
            raise ValueError(f"expected hidden states (B, T>0, D), got shape {tuple(hidden.shape)}")
        batch, steps, _ = hidden.shape
        if len(cache.blocks):
            total = cache.length + steps
            key_positions = torch.arange(total, device=hidden.device).expand(batch, total)
            positions = key_positions[:, cache.length :]
            bias = attention_bias(
                torch.ones_like(key_positions, dtype=torch.bool),
                key_positions,
                causal=True,
                dtype=hidden.dtype,
                query_positions=positions,
            )
            rotary = self._rotary(hidden, positions)
            for layer in self._layers[cache.blocks.start : cache.blocks.end]:
                hidden = layer(
                    hidden,
                    attention_mask=bias,
                    position_ids=positions,
                    position_embeddings=rotary,
                    past_key_values=cache.kv,
                )
        cache.length += steps
        return hidden

    def front_step(self, cache: DecoderCache, input_ids: torch.Tensor) -> torch.Tensor:
        """Edge half of a generation step: next token ids ``(B, T)`` -> hidden state at the split ``(B, T, D)``.

        Prefill passes the whole prompt, each decode step the one token chosen last.
        """
        if cache.blocks.start != 0:
            raise InvalidSplitError(
                f"a front cache holds blocks from 0, not [{cache.blocks.start}, {cache.blocks.end})"
            )
        if input_ids.dim() != 2:
            raise ValueError(f"expected token ids (B, T), got shape {tuple(input_ids.shape)}")
        return self._cached_blocks(self._embed_tokens(input_ids), cache)

    def back_step(self, cache: DecoderCache, hidden: torch.Tensor) -> torch.Tensor:
        """Cloud half of a generation step: hidden state at the split ``(B, T, D)`` -> next-token logits ``(B, V)``."""
        if cache.blocks.end != len(self._layers):
            raise InvalidSplitError(
                f"a back cache holds blocks up to {len(self._layers)}, not [{cache.blocks.start}, {cache.blocks.end})"
            )
        hidden = self._cached_blocks(hidden, cache)
        return self.head(hidden, torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device))

    def head(
        self, hidden: torch.Tensor, token_mask: torch.Tensor, token_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Output of the last block ``(B, T, D)`` -> answer.

        Encoder: mean over real tokens (weighted by ``token_weights`` when given), L2-normalised,
        ``(B, D)``. Decoder: next-token logits after the last real token, ``(B, V)``.
        """
        if self.causal:
            last = token_mask.long().sum(dim=1).clamp(min=1) - 1
            final = self._final_norm(hidden[torch.arange(hidden.shape[0]), last])
            return self._lm_head(final)
        weights = token_mask.to(hidden.dtype)
        if token_weights is not None:
            weights = weights * token_weights.to(hidden.dtype)
        weights = weights.unsqueeze(-1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=-1)

    def run_front(self, cut: Cut, input_ids: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Edge half: token ids ``(B, T)`` -> hidden state at the split ``(B, T, D)``."""
        return self.blocks(self.embed(input_ids, token_mask), token_mask, cut.front)

    def run_back(
        self,
        cut: Cut,
        hidden: torch.Tensor,
        token_mask: torch.Tensor,
        positions: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cloud half: hidden state at the split ``(B, T, D)`` -> answer (see :meth:`head`)."""
        hidden = self.blocks(hidden, token_mask, cut.back, positions, token_weights)
        return self.head(hidden, token_mask, token_weights)

    def token_logits(
        self, cut: Cut, hidden: torch.Tensor, token_mask: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decoder cloud half at every position: hidden state at the split ``(B, T, D)`` -> logits ``(B, T, V)``
        (position t predicts token t + 1). What perplexity and the codec's training loss are measured on."""
        if not self.causal:
            raise InvalidSplitError(f"{self.model.name} is an encoder: it has no next-token logits")
        hidden = self.blocks(hidden, token_mask, cut.back, positions)
        return self._lm_head(self._final_norm(hidden))

    def run_unsplit(self, input_ids: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """The whole model in one process: the reference every split is measured against."""
        everything = Cut(self.model.num_blocks, self.model.num_blocks)
        return self.head(self.run_front(everything, input_ids, token_mask), token_mask)

    def run_unsplit_texts(self, texts: Sequence[str], batch: int = 128, max_tokens: int | None = None) -> torch.Tensor:
        """:meth:`run_unsplit` over many texts, ``batch`` at a time, each cut to ``max_tokens`` when given:
        one answer row per text, in order. The reference a benchmark scores against and a codec trains to."""
        answers = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch):
                input_ids, token_mask = self.model.tokenize(list(texts[start : start + batch]))
                if max_tokens is not None:
                    input_ids, token_mask = input_ids[:, :max_tokens], token_mask[:, :max_tokens]
                answers.append(self.run_unsplit(input_ids, token_mask))
        return torch.cat(answers)
