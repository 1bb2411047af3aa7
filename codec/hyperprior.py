"""The hyperprior codec: a per-token side signal tells the decoder the mean and scale of every
latent (Ballé et al., ICLR 2018; means as in Minnen et al., NeurIPS 2018).

::

    hidden (T, D) -standardise-> g_a -> y (T, C) --------------------> round(y - mu) --> range coder (scale tables)
                                        |                                 ^   ^
                                        h_a -> z (T, G) -round-> z_hat ---+   |
                                                 |                  |         |
                                   DeepFactorizedDensity -> coder   h_s -> mu, scale index
    y_hat = round(y - mu) + mu -> g_s -> hidden_hat

At coding time ``h_s`` runs in integer arithmetic (weights in fixed point, as in Ballé et al.,
"Integer networks for data compression with latent-variable models", ICLR 2019), so the scale index
of every symbol is bit-identical on the encoder and the decoder whatever the machine.

With ``context_channels > 0`` a per-sequence context ``c`` (the mean over tokens of ``g_c(hidden)``,
quantised and coded once per payload) joins ``z_hat`` at the input of ``h_s`` and ``y_hat`` at the
input of ``g_s``: what all tokens share is sent once instead of once per token.

With ``temporal``, each token's means also get a prediction from the token before it in the same
payload: a linear map of that token's decoded latents (predictive coding, as DPCM codes a signal's
difference from what its past predicts). Only the means change, not the scales, so the decoder still
entropy-decodes every symbol first and then rebuilds the latents token by token; the prediction runs
in fixed point, as the integer ``h_s`` does, so both peers rebuild the same latents bit for bit. The
first token of a payload is predicted from nothing, unless the payload continues a stream (a
generation's steps): each peer then keeps a :class:`LatentCarry`, the last token's latents, from one
payload to the next, so a one-token step is predicted from the token before it too.

With ``raw_token_threshold > 0``, a token whose largest absolute value exceeds the threshold is sent
apart, as float16, ahead of the coded stream. Decoder LMs put activations in the tens of thousands on a
few tokens (the attention sink, usually the first token); no Gaussian table covers those, and
letting them into the statistics would flatten every other token's standardised values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import constriction
import numpy as np
import torch
from splitwire.codec.base import CodecKind
from splitwire.codec.container import read_varint, write_varint
from splitwire.codec.entropy import (
    CodedStream,
    DeepFactorizedDensity,
    ScaleTables,
    categorical,
    gaussian_likelihood,
    table_bits,
)
from splitwire.codec.errors import BitstreamError
from splitwire.codec.learned import (
    CodingModel,
    FrozenLayers,
    FusedResidual,
    LearnedCodec,
    QuantMode,
    ResidualTransform,
    Standardizer,
    TokenGate,
    TokenMLP,
    principal_directions,
    quantize,
)

FRACTION_BITS = 12  # fixed-point precision of the integer h_s, per layer
# Revision 2 codes the per-sequence context in one range-coder call with constriction's per-row model
# family (revision 1 made one call per context channel, each with a model built from its table). The
# rows come from the checkpoint, so what a call allocates does not grow with the claimed token count.
BITSTREAM_REVISION = 2
TABLE_FAMILY = constriction.stream.model.Categorical(perfect=False)  # one row of counts per symbol
# The temporal prediction reads the previous token's latents rounded to 1/2**TEMPORAL_INPUT_BITS, with
# weights in fixed point of FRACTION_BITS: every product and sum is then an integer, exact in float64.
TEMPORAL_INPUT_BITS = 8
# The ridge that starts the temporal prediction, relative to the inputs' mean energy: a few thousand
# tokens fit half a million weights.
TEMPORAL_RIDGE = 0.1
FLOAT16_MAX = 65504.0
# Decoded values proven below this need no finiteness check: far under float32's 3.4e38, so rounding
# in the products cannot carry a partial sum past it.
FINITE_OUTPUT_BOUND = 1e30


class HyperpriorModel(CodingModel):
    def __init__(
        self,
        width: int,
        latent_channels: int = 64,
        side_channels: int = 8,
        hidden: int = 256,
        layers: int = 2,
        hyper_hidden: int = 64,
        scale_count: int = 64,
        scale_min: float = 0.11,
        scale_max: float = 64.0,
        token_gate: bool = False,
        context_channels: int = 0,
        raw_token_threshold: float = 0.0,
        context_hidden: int | None = None,
        temporal: bool = False,
    ) -> None:
        super().__init__()
        if not 2 <= scale_count <= np.iinfo(np.int16).max:  # scale indices are sorted as 16-bit keys
            raise ValueError(f"scale_count must be between 2 and {np.iinfo(np.int16).max}, got {scale_count}")
        self.config = {
            "width": width,
            "latent_channels": latent_channels,
            "side_channels": side_channels,
            "hidden": hidden,
            "layers": layers,
            "hyper_hidden": hyper_hidden,
            "scale_count": scale_count,
            "scale_min": scale_min,
            "scale_max": scale_max,
            "token_gate": token_gate,
            "context_channels": context_channels,
        }
        if raw_token_threshold:  # absent when off, so codecs trained before it keep their fingerprints
            self.config["raw_token_threshold"] = raw_token_threshold
        if context_hidden is not None:  # likewise: absent, g_c is as wide as the other transforms
            self.config["context_hidden"] = context_hidden
        if temporal:  # likewise
            self.config["temporal"] = True
        self.width, self.raw_token_threshold = width, raw_token_threshold
        self.channels, self.side_channels = latent_channels, side_channels
        self.scale_min, self.scale_max = scale_min, scale_max
        self.standardize = Standardizer(width)
        self.g_a = ResidualTransform(width, latent_channels, hidden, layers)
        self.context_channels = context_channels
        self.g_s = ResidualTransform(latent_channels + context_channels, width, hidden, layers)
        self.h_a = TokenMLP(latent_channels, side_channels, hyper_hidden, 1, activation="relu")
        # Exactly Linear -> ReLU -> Linear: the integer version below mirrors this shape.
        self.h_s = TokenMLP(side_channels + context_channels, 2 * latent_channels, hyper_hidden, 1, activation="relu")
        self.side_density = DeepFactorizedDensity(side_channels)
        if context_channels:
            self.g_c = ResidualTransform(
                width, context_channels, hidden if context_hidden is None else context_hidden, layers
            )
            self.context_density = DeepFactorizedDensity(context_channels)
        self.gate = TokenGate(width) if token_gate else None
        # Predicts nothing until fit_temporal() starts it from the data.
        self.temporal = torch.nn.Linear(latent_channels, latent_channels, bias=False) if temporal else None
        if self.temporal is not None:
            torch.nn.init.zeros_(self.temporal.weight)
            self.register_buffer("temporal_weight", torch.zeros(0, 0, dtype=torch.int64))
        else:  # not part of the state dict
            self.temporal_weight = torch.zeros(0, 0, dtype=torch.int64)
        self.scales = ScaleTables.default_scales(scale_count, scale_min, scale_max)
        if context_channels:
            self.register_buffer("context_offsets", torch.zeros(0, dtype=torch.int64))
            self.register_buffer("context_counts", torch.zeros(0, 0, dtype=torch.int64))
        else:  # no context: empty tables, not part of the state dict
            self.context_offsets = torch.zeros(0, dtype=torch.int64)
            self.context_counts = torch.zeros(0, 0, dtype=torch.int64)
        for name, dtype in (
            ("side_offsets", torch.int64),
            ("side_counts", torch.int64),
            ("scale_half_widths", torch.int64),
            ("scale_counts", torch.int64),
            ("scale_thresholds", torch.int64),
            ("hs_w1", torch.int64),
            ("hs_b1", torch.int64),
            ("hs_w2", torch.int64),
            ("hs_b2", torch.int64),
        ):
            self.register_buffer(name, torch.zeros(0, dtype=dtype))
        self._models: _CodingModels | None = None

    # -- training -------------------------------------------------------------------------------

    def raw_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., T, D)`` -> ``(..., T)`` bool: the tokens sent apart as float16."""
        if not self.raw_token_threshold:
            return torch.zeros(hidden.shape[:-1], dtype=torch.bool, device=hidden.device)
        return hidden.abs().amax(dim=-1) > self.raw_token_threshold

    def raw_token_bits(self) -> float:
        """What one raw token costs: its float16 values and (about) one byte of position."""
        return 16.0 * self.width + 8.0

    @torch.no_grad()
    def fit(self, samples: torch.Tensor, latent_scale: float = 1.0, shared_step: bool = False) -> None:
        """Standardise with ``samples``' statistics and start the transforms as PCA onto the latent.

        By default the latents are the standardised samples' whitened components times ``latent_scale``:
        rounding starts at 1 / latent_scale of each component's standard deviation, so every component
        gets about the same bits (a finer start suits distortions that punish small errors, such as an
        LM's KL). With ``shared_step`` they are the principal components of the hidden states themselves,
        all rounded with one step, 1 / latent_scale of their root-mean-square standard deviation: the
        allocation that minimises the squared error for the bits (reverse water-filling), where weak
        components cost little or nothing.
        """
        samples = samples[~self.raw_tokens(samples)]
        self.standardize.fit(samples)
        standardized = self.standardize(samples)
        channel_std = self.standardize.std
        if shared_step:
            basis, std = principal_directions(samples, self.channels)  # it centres them itself
            step = std.square().mean().sqrt() / latent_scale
            analysis = channel_std[:, None] * basis / step
            synthesis = basis.t() * step / channel_std
        else:
            basis, std = principal_directions(standardized, self.channels)
            analysis = basis / std * latent_scale
            synthesis = (basis * std).t() / latent_scale
        self.g_a.init_linear(analysis)
        # The context starts with no say in the reconstruction; training gives it one.
        self.g_s.init_linear(torch.cat([synthesis, torch.zeros(self.context_channels, basis.shape[0])]))
        if self.context_channels:
            context_basis, context_std = principal_directions(standardized, self.context_channels)
            self.g_c.init_linear(context_basis / context_std)

    @torch.no_grad()
    def fit_temporal(self, sequences: Sequence[torch.Tensor]) -> None:
        """Start the temporal prediction as the ridge regression of each token's latents on the decoded
        latents of the token before it, over ``sequences`` of ``(T, D)`` hidden states, after :meth:`fit`."""
        assert self.temporal is not None, "fit_temporal() on a hyperprior without a temporal prediction"
        inputs, targets = [], []
        for hidden in sequences:
            raw = self.raw_tokens(hidden)
            y = self.g_a(self.standardize(hidden).masked_fill(raw.unsqueeze(-1), 0.0))
            previous = self._previous_latents(y, raw)
            has_previous = ~raw
            has_previous[0] = False
            has_previous[1:] &= ~raw[:-1]
            inputs.append(previous[has_previous])
            targets.append(y[has_previous])
        x, target = torch.cat(inputs).double(), torch.cat(targets).double()
        gram = x.t() @ x
        ridge = TEMPORAL_RIDGE * float(gram.diagonal().mean()) * torch.eye(len(gram), dtype=torch.float64)
        self.temporal.weight.copy_(torch.linalg.solve(gram + ridge, x.t() @ target).t().float())

    def _mean_scale(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_scale = self.h_s(z_hat).chunk(2, dim=-1)
        return mean, torch.exp(log_scale).clamp(self.scale_min, self.scale_max)

    def _context(self, standardized: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """``(B, T, D)`` -> the per-sequence context before quantisation ``(B, Cc)``."""
        per_token = self.g_c(standardized)
        if token_mask is None:
            return per_token.mean(dim=-2)
        weights = token_mask.to(per_token.dtype).unsqueeze(-1)
        return (per_token * weights).sum(dim=-2) / weights.sum(dim=-2).clamp_min(1.0)

    def forward(
        self, hidden: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.raw_tokens(hidden)
        # Raw tokens enter the transforms as the mean token, so their huge values produce no gradients.
        x = self.standardize(hidden).masked_fill(raw.unsqueeze(-1), 0.0)
        if token_mask is not None:
            token_mask = token_mask & ~raw
        y = self.g_a(x)
        z = self.h_a(y)
        bits = -torch.log2(self.side_density.likelihood(quantize(z, QuantMode.NOISE))).sum(-1)
        hyper_input, synthesis_extra = quantize(z, QuantMode.STE), []
        if self.context_channels:
            context = self._context(x, token_mask)
            context_bits = -torch.log2(self.context_density.likelihood(quantize(context, QuantMode.NOISE))).sum(-1)
            tokens = x.shape[-2] if token_mask is None else token_mask.sum(-1, keepdim=True).clamp_min(1)
            bits = bits + context_bits.unsqueeze(-1) / tokens  # spread over the sequence's tokens
            shared = quantize(context, QuantMode.STE).unsqueeze(-2).expand(*y.shape[:-1], self.context_channels)
            hyper_input = torch.cat([hyper_input, shared], dim=-1)
            synthesis_extra = [shared]
        mean, scale = self._mean_scale(hyper_input)
        if self.temporal is not None:
            mean = mean + self.temporal(self._previous_latents(y, raw))
        bits = bits - torch.log2(gaussian_likelihood(quantize(y, QuantMode.NOISE), mean, scale)).sum(-1)
        y_hat = quantize(y, QuantMode.STE, offset=mean)
        hidden_hat = self.standardize.inverse(self.g_s(torch.cat([y_hat, *synthesis_extra], dim=-1)))
        if self.raw_token_threshold:
            exact = hidden.clamp(-FLOAT16_MAX, FLOAT16_MAX).half().to(hidden.dtype)
            hidden_hat = torch.where(raw.unsqueeze(-1), exact, hidden_hat)
            bits = torch.where(raw, torch.full_like(bits, self.raw_token_bits()), bits)
        return hidden_hat, bits

    @staticmethod
    def _previous_latents(y: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """What the decoder holds of the token before each one: its latents with a rounding's error
        (uniform noise, as in the rate term), zeros before the first token and after a raw one. (Coding
        predicts the token after a raw one from the coded token before it; raw tokens other than a
        sequence's first, the attention sink, are rare.)"""
        decoded = quantize(y, QuantMode.NOISE).masked_fill(raw.unsqueeze(-1), 0.0)
        return torch.nn.functional.pad(decoded[..., :-1, :], (0, 0, 1, 0))

    # -- integer tables and integer h_s ---------------------------------------------------------

    def update_tables(self) -> None:
        offsets, counts = self.side_density.to_tables()
        self.side_offsets, self.side_counts = torch.from_numpy(offsets), torch.from_numpy(counts)
        if self.context_channels:
            offsets, counts = self.context_density.to_tables()
            self.context_offsets, self.context_counts = torch.from_numpy(offsets), torch.from_numpy(counts)
        tables = ScaleTables(self.scales)
        width = max(len(t) for t in tables.tables)
        padded = np.zeros((len(tables.tables), width), dtype=np.int64)
        for i, table in enumerate(tables.tables):
            padded[i, : len(table)] = table
        self.scale_half_widths = torch.from_numpy(tables.half_widths)
        self.scale_counts = torch.from_numpy(padded)
        # Geometric midpoints between neighbouring scales, as fixed-point log-scales.
        mids = 0.5 * (np.log(self.scales[:-1]) + np.log(self.scales[1:]))
        self.scale_thresholds = torch.from_numpy(np.round(mids * 2.0 ** (2 * FRACTION_BITS)).astype(np.int64))
        first, second = self.h_s.net[0], self.h_s.net[2]
        one = 2.0**FRACTION_BITS
        self.hs_w1 = torch.round(first.weight.double() * one).long()
        self.hs_b1 = torch.round(first.bias.double() * one).long()
        self.hs_w2 = torch.round(second.weight.double() * one).long()
        self.hs_b2 = torch.round(second.bias.double() * one * one).long()
        if self.temporal is not None:
            self.temporal_weight = torch.round(self.temporal.weight.double() * one).long()
        self._models = None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        self._models = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- coding ---------------------------------------------------------------------------------

    def _coding_models(self) -> _CodingModels:
        if self._models is None:
            side_sizes = (self.side_counts > 0).sum(1)
            context_sizes = (self.context_counts > 0).sum(1)
            side_network = self._checked_side_network()
            synthesis = self.g_s.fused(out_shift=self.standardize.mean, out_scale=self.standardize.std)
            self._models = _CodingModels(
                context=self.context_counts.numpy().astype(np.float64),
                context_sizes=context_sizes.tolist(),
                side=[categorical(row[row > 0]) for row in self.side_counts.numpy()],
                main=[categorical(row[row > 0]) for row in self.scale_counts.numpy()],
                side_range=_TableRange.of(self.side_offsets, side_sizes),
                context_range=_TableRange.of(self.context_offsets, context_sizes),
                half_widths=self.scale_half_widths.numpy(),
                side_network=side_network,
                analysis=_Analysis.of(
                    self.g_a.fused(in_shift=self.standardize.mean, in_scale=self.standardize.std),
                    self.g_c.fused(in_shift=self.standardize.mean, in_scale=self.standardize.std)
                    if self.context_channels
                    else None,
                ),
                side_analysis=self.h_a.frozen(),
                synthesis=synthesis,
                temporal=self._checked_temporal(side_network) if self.temporal is not None else None,
                finite_output=self._finite_output(side_network, synthesis),
            )
        return self._models

    def _checked_side_network(self) -> _IntegerSideNetwork:
        """The integer h_s in float64, after proving its arithmetic stays exact."""
        w1, b1, w2, b2 = (t.double() for t in (self.hs_w1, self.hs_b1, self.hs_w2, self.hs_b2))
        largest_input = self._largest_side_input()
        largest_hidden = largest_input * float(w1.abs().sum(1).max()) + float(b1.abs().max())
        largest_out = largest_hidden * float(w2.abs().sum(1).max()) + float(b2.abs().max())
        if largest_out >= 2.0**52:
            raise ValueError("side network weights are too large for exact fixed-point evaluation")
        # Scaling by a power of two moves only exponents: the means come out in latent units, still exact.
        unit = 2.0 ** -(2 * FRACTION_BITS)
        means = slice(0, self.channels)
        largest_mean = (largest_hidden * float(w2[means].abs().sum(1).max()) + float(b2[means].abs().max())) * unit
        w1, w2 = w1.t(), w2.t()
        return _IntegerSideNetwork(
            side_weight=w1[: self.side_channels].contiguous(),
            context_weight=w1[self.side_channels :].contiguous(),
            bias=b1,
            mean_weight=(w2[:, : self.channels] * unit).contiguous(),
            mean_bias=b2[: self.channels] * unit,
            scale_weight=w2[:, self.channels :].contiguous(),
            scale_bias=b2[self.channels :],
            thresholds=self.scale_thresholds.double(),
            largest_mean=largest_mean,
        )

    def _checked_temporal(self, side_network: _IntegerSideNetwork) -> _TemporalPredictor:
        """The fixed-point prediction in float64, after proving its arithmetic stays exact."""
        weight = self.temporal_weight.double()
        largest_input = self._largest_latent(side_network) * 2.0**TEMPORAL_INPUT_BITS + 1
        if largest_input * float(weight.abs().sum(1).max()) >= 2.0**52:
            raise ValueError("temporal prediction weights are too large for exact fixed-point evaluation")
        # Predictions are clamped to the widest table's range.
        return _TemporalPredictor(weight.t().numpy().copy(), float(self.scale_half_widths.max()))

    def _largest_latent(self, side_network: _IntegerSideNetwork) -> float:
        """A bound on a decoded latent's magnitude: a symbol lies within its table's half width of an
        exact, bounded mean, the temporal prediction within the widest table's range."""
        half_width = float(self.scale_half_widths.max())
        return half_width + side_network.largest_mean + (half_width if self.temporal is not None else 0.0)

    def _largest_side_input(self) -> float:
        """The largest magnitude of a value the side and context tables cover: h_s's inputs."""
        largest = 0.0
        for offsets, counts in ((self.side_offsets, self.side_counts), (self.context_offsets, self.context_counts)):
            if offsets.numel():
                last = offsets + (counts > 0).sum(1) - 1
                largest = max(largest, float(torch.maximum(offsets.abs(), last.abs()).max()))
        return largest

    def decodes_only_finite(self) -> bool:
        return self._coding_models().finite_output

    def _finite_output(self, side_network: _IntegerSideNetwork, synthesis: FusedResidual) -> bool:
        """Decoding is finite by construction when the synthesis cannot overflow float32 on any input a
        body can give it: latents lie within their table's half width of an exact, bounded mean, the
        context within its table; raw tokens are checked as they are read."""
        largest_side = self._largest_side_input()
        return synthesis.output_bound(max(self._largest_latent(side_network), largest_side)) < FINITE_OUTPUT_BOUND

    def _symbols(self, hidden: torch.Tensor, carry: LatentCarry | None = None) -> _Symbols:
        # Torch until the entropy coder: the encoder runs right after the model's front blocks, whose
        # math library is then warm, while each first call into another library costs tens of microseconds.
        models = self._coding_models()
        hidden = hidden.float()
        y, context = models.analysis(hidden)
        side = models.side_range.clamp(models.side_analysis(y))
        context = models.context_range.clamp(context)
        mean, scale_index = models.side_network(side, context)
        half = torch.take(models.half_widths_tensor, scale_index)
        # Each main symbol as an index into its scale's table, which covers -half .. half; int32, as the
        # entropy coder takes them.
        last_latents = None
        if models.temporal is None:
            main = torch.round(y.double() - mean).clamp_(-half, half).add_(half)
        else:
            signed, last_latents = models.temporal.quantise(
                y.double().numpy(), mean.numpy(), half.numpy(), carry.previous if carry else None
            )
            main = torch.from_numpy(signed).add_(half)
        return _Symbols(
            models.context_range.indices(context),
            models.side_range.indices(side),
            main.int().numpy(),
            scale_index.numpy(),
            last_latents,
        )

    def _coding_order(self, scale_index: np.ndarray, counts: Sequence[int]) -> tuple[np.ndarray, list[list[int]]]:
        """How the main symbols of bodies stacked ``(sum T, C)`` (``counts`` tokens each) are coded: body by
        body, grouped by scale index ascending, in their flat order within a group. Returns their flat
        positions in that order and, per body, the number of symbols at each scale index (Python ints:
        the coding loops index with them)."""
        scales = len(self._coding_models().main)
        keys = scale_index.ravel()
        if len(counts) > 1:
            body_of_row = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
            keys = (body_of_row[:, None] * scales + scale_index).ravel()
        # A stable sort of 16-bit keys is a radix sort in NumPy, several times faster than wider ones.
        order = np.argsort(keys.astype(np.int16) if len(counts) * scales < 2**15 else keys, kind="stable")
        sizes = np.bincount(keys, minlength=len(counts) * scales).reshape(len(counts), scales)
        return order, sizes.tolist()

    def new_carry(self) -> LatentCarry | None:
        return LatentCarry() if self.temporal is not None else None

    def compress_carried(self, hidden: torch.Tensor, carry: object) -> bytes:
        assert isinstance(carry, LatentCarry)
        return self.compress(hidden, carry)

    def decompress_carried(self, body: bytes | memoryview, tokens: int, carry: object) -> torch.Tensor:
        assert isinstance(carry, LatentCarry)
        return self.decompress(body, tokens, carry)

    def compress(self, hidden: torch.Tensor, carry: LatentCarry | None = None) -> bytes:
        if not self.raw_token_threshold:
            return self._compress_coded(hidden, carry)
        raw = self.raw_tokens(hidden)
        out = bytearray()
        indices = np.flatnonzero(raw.numpy())
        write_varint(len(indices), out)
        previous = -1
        for index in indices:  # gaps: the first raw token's position, then distances minus one
            write_varint(int(index) - previous - 1, out)
            previous = int(index)
        out += hidden[raw].clamp(-FLOAT16_MAX, FLOAT16_MAX).numpy().astype("<f2").tobytes()
        if len(indices) < hidden.shape[0]:
            out += self._compress_coded(hidden[~raw], carry)
        return bytes(out)

    def decompress(self, body: bytes | memoryview, tokens: int, carry: LatentCarry | None = None) -> torch.Tensor:
        if not self.raw_token_threshold:
            return self._decompress_coded(body, tokens, carry)
        data = memoryview(body)
        count, offset = read_varint(data, 0, "raw token count", part="body")
        if count > tokens:
            raise BitstreamError(f"body claims {count} raw tokens in a payload of {tokens}")
        indices, previous = [], -1
        for _ in range(count):
            gap, offset = read_varint(data, offset, "raw token position", part="body")
            previous += gap + 1
            if previous >= tokens:
                raise BitstreamError(f"raw token position {previous} is outside a payload of {tokens} tokens")
            indices.append(previous)
        size = 2 * count * self.width
        if offset + size > len(data):
            raise BitstreamError(f"truncated body: {count} raw tokens need {size} bytes, {len(data) - offset} left")
        rows = np.frombuffer(data[offset : offset + size], dtype="<f2").reshape(count, self.width)
        if not np.isfinite(rows).all():
            raise BitstreamError("raw tokens hold values that are not finite")
        rest = data[offset + size :]
        hidden = torch.empty(tokens, self.width)
        coded = np.ones(tokens, dtype=bool)
        coded[indices] = False
        if count < tokens:
            hidden[torch.from_numpy(coded)] = self._decompress_coded(rest, tokens - count, carry)
        elif len(rest):
            raise BitstreamError(f"{len(rest)} bytes after the last raw token of a payload with no coded tokens")
        hidden[indices] = torch.from_numpy(rows.astype(np.float32))
        return hidden

    def _compress_coded(self, hidden: torch.Tensor, carry: LatentCarry | None) -> bytes:
        symbols = self._symbols(hidden, carry)
        models = self._coding_models()
        order, (sizes,) = self._coding_order(symbols.scale_index, [symbols.scale_index.shape[0]])
        values = symbols.main.ravel()[order]  # in coding order
        stream = CodedStream()
        # What the decoder needs first comes first: the context, the side channels 0..G-1, then the
        # main symbols grouped by scale index, ascending.
        stream.push_rows(symbols.context, TABLE_FAMILY, models.context)
        side = np.ascontiguousarray(symbols.side.T, dtype=np.int32)
        for g in range(self.side_channels):
            stream.push(side[g], models.side[g])
        start = 0
        for model, size in zip(models.main, sizes, strict=True):
            if size:
                stream.push(values[start : start + size], model)
                start += size
        body = stream.to_bytes()
        if carry is not None:
            carry.previous = symbols.last_latents
        return body

    def _decompress_coded(self, body: bytes | memoryview, tokens: int, carry: LatentCarry | None) -> torch.Tensor:
        models = self._coding_models()
        stream = CodedStream(body)
        context, side = self._read_side(stream, tokens)
        context_values = models.context_range.values(context)
        mean, scale_index = models.side_network(models.side_range.values(side.T), context_values)
        main = self._read_main(stream, scale_index.numpy())
        if models.temporal is None:
            y_hat = torch.from_numpy(main) + mean
        else:
            latents = models.temporal.reconstruct(main, mean.numpy(), carry.previous if carry else None)
            if carry is not None and len(latents):
                carry.previous = latents[-1].copy()
            y_hat = torch.from_numpy(latents)
        return models.synthesis.with_shared(y_hat.float(), context_values.float())

    def decompress_many(self, items: Sequence[tuple[bytes | memoryview, int]]) -> list[torch.Tensor | BitstreamError]:
        if self.raw_token_threshold or self.temporal is not None:
            # Raw tokens split each body first, a temporal prediction runs token by token: one at a time.
            return super().decompress_many(items)
        models = self._coding_models()
        results: list[torch.Tensor | BitstreamError | None] = [None] * len(items)
        read: list[tuple[int, CodedStream, np.ndarray, np.ndarray]] = []  # item index, stream, context, side
        for index, (body, tokens) in enumerate(items):
            stream = CodedStream(body)
            try:
                context, side = self._read_side(stream, tokens)
            except BitstreamError as exc:
                results[index] = exc
                continue
            read.append((index, stream, context, side))
        if not read:
            return results  # type: ignore[return-value]
        # The side network and the synthesis run once over every body's tokens, each sequence's
        # context added to its own rows; the side network is exact, so the scale indices are too.
        counts = [side.shape[1] for *_, side in read]
        contexts = models.context_range.values(np.stack([context for _, _, context, _ in read]))
        sides = models.side_range.values(np.concatenate([side.T for *_, side in read]))
        mean, scale_index = models.side_network.per_sequence(sides, contexts, torch.tensor(counts))
        main, failures = self._read_mains([stream for _, stream, _, _ in read], scale_index.numpy(), counts)
        kept = [position for position, failure in enumerate(failures) if failure is None]
        for position, failure in enumerate(failures):
            if failure is not None:
                results[read[position][0]] = failure
        if kept:
            latents = torch.from_numpy(main).add_(mean).float()
            kept_counts = [counts[position] for position in kept]
            if len(kept) < len(read):
                rows = np.repeat(np.isin(np.arange(len(read)), kept), counts)
                latents, contexts = latents[torch.from_numpy(rows)], contexts[kept]
            hidden = models.synthesis.with_shared_per_sequence(latents, contexts.float(), torch.tensor(kept_counts))
            for position, rows in zip(kept, hidden.split(kept_counts), strict=True):
                results[read[position][0]] = rows
        return results  # type: ignore[return-value]

    def _read_side(self, stream: CodedStream, tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """The front of a coded body: the context ``(Cc,)`` and side ``(G, tokens)`` as table indices."""
        models = self._coding_models()
        context = np.zeros(0, dtype=np.int32)
        if self.context_channels:
            context = stream.pop_rows(TABLE_FAMILY, models.context)
            # In Python: on 128 symbols it beats NumPy's comparison and reduction, which the decoder
            # would be the first to call after the model's blocks, from cold caches.
            if not all(map(int.__lt__, context.tolist(), models.context_sizes)):
                raise BitstreamError("a context symbol lies outside its channel's table")
        side = np.empty((self.side_channels, tokens), dtype=np.int32)
        for g in range(self.side_channels):
            side[g] = stream.pop(tokens, models.side[g])
        return context, side

    def _read_main(self, stream: CodedStream, scale_index: np.ndarray) -> np.ndarray:
        """The rest of a coded body: the main symbols ``(T, C)``, signed, float64, given their scale
        indices ``(T, C)``; the body must end with them."""
        main, (failure,) = self._read_mains([stream], scale_index, [scale_index.shape[0]])
        if failure is not None:
            raise failure
        return main

    def _read_mains(
        self, streams: Sequence[CodedStream], scale_index: np.ndarray, counts: Sequence[int]
    ) -> tuple[np.ndarray, list[BitstreamError | None]]:
        """:meth:`_read_main` for several bodies at once: their scale indices stacked ``(sum T, C)`` and each
        one's token count -> the main symbols ``(sum T, C)`` and, per body, None or why it did not decode
        (its rows then hold nothing meaningful)."""
        models = self._coding_models()
        order, group_sizes = self._coding_order(scale_index, counts)
        indices = np.zeros(scale_index.size, dtype=np.int64)  # table indices in coding order
        failures: list[BitstreamError | None] = []
        position = 0
        for stream, sizes in zip(streams, group_sizes, strict=True):
            end = position + sum(sizes)
            try:
                for model, size in zip(models.main, sizes, strict=True):
                    if size:
                        indices[position : position + size] = stream.pop(size, model)
                        position += size
                stream.finish()
                failures.append(None)
            except BitstreamError as exc:
                failures.append(exc)
            position = end
        main = np.empty(scale_index.size, dtype=np.float64)
        main[order] = indices
        main -= models.half_widths[scale_index.ravel()]
        return main.reshape(scale_index.shape), failures

    def estimate_bits(self, hidden: torch.Tensor) -> float:
        raw = self.raw_tokens(hidden)
        if not raw.any():
            return self._estimate_coded_bits(hidden)
        count = int(raw.sum())
        bits = count * self.raw_token_bits()
        return bits + (self._estimate_coded_bits(hidden[~raw]) if count < hidden.shape[0] else 0.0)

    def _estimate_coded_bits(self, hidden: torch.Tensor) -> float:
        symbols = self._symbols(hidden)
        side_counts, scale_counts = self.side_counts.numpy(), self.scale_counts.numpy()
        context_counts = self.context_counts.numpy()
        bits = sum(table_bits(context_counts[c], symbols.context[c : c + 1]) for c in range(self.context_channels))
        bits += sum(table_bits(side_counts[g], symbols.side[:, g]) for g in range(self.side_channels))
        for s in np.unique(symbols.scale_index):
            where = symbols.scale_index == s
            bits += table_bits(scale_counts[s], symbols.main[where])
        return float(bits)


@dataclass(frozen=True)
class _Symbols:
    """One sequence's symbols as indices into their tables: context, side, and main (its scale's table)."""

    context: np.ndarray  # (Cc,)
    side: np.ndarray  # (T, G)
    main: np.ndarray  # (T, C)
    scale_index: np.ndarray  # (T, C)
    last_latents: np.ndarray | None  # (C,) with a temporal prediction: the last token's decoded latents


@dataclass
class LatentCarry:
    """What a temporal prediction carries along a stream: the decoded latents ``(C,)`` of the last coded
    token of the stream's payloads so far (None before the first). Encoder and decoder each keep one."""

    previous: np.ndarray | None = None


@dataclass(frozen=True)
class _TableRange:
    """The values each channel's table covers, ``offset .. offset + size - 1``, as float64 tensors."""

    low: torch.Tensor
    high: torch.Tensor

    @classmethod
    def of(cls, offsets: torch.Tensor, sizes: torch.Tensor) -> _TableRange:
        return cls(offsets.double(), (offsets + sizes - 1).double())

    def clamp(self, values: torch.Tensor) -> torch.Tensor:
        """Round ``values`` ``(..., channels)`` and clamp them into their channel's table (float64)."""
        return torch.round(values.double()).clamp_(self.low, self.high)

    def indices(self, values: torch.Tensor) -> np.ndarray:
        """Clamped values -> indices into the tables (int32, as the entropy coder takes them)."""
        return (values - self.low).int().numpy()

    def values(self, indices: np.ndarray) -> torch.Tensor:
        """Indices into the tables -> values (float64)."""
        return torch.from_numpy(indices).double() + self.low


@dataclass(frozen=True)
class _Analysis:
    """g_a and (with a context) g_c as the encoder runs them on the same tokens: one product gives g_a's
    linear map and first MLP layer and g_c's first MLP layer; g_c's linear map acts on the mean token."""

    weight: torch.Tensor  # (D, C + H_a [+ H_c])
    bias: torch.Tensor
    latent: FusedResidual
    context: FusedResidual | None

    @classmethod
    def of(cls, latent: FusedResidual, context: FusedResidual | None) -> _Analysis:
        if context is None:
            return cls(latent.first_weight, latent.first_bias, latent, None)
        out = context.out_dim
        weight = torch.cat([latent.first_weight, context.first_weight[:, out:]], dim=1).contiguous()
        return cls(weight, torch.cat([latent.first_bias, context.first_bias[out:]]), latent, context)

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, D)`` -> the latent ``(T, C)`` and the per-sequence context ``(Cc,)`` (empty without one)."""
        first = torch.addmm(self.bias, hidden, self.weight)
        latent_width = self.latent.first_weight.shape[1]
        y = self.latent.finish(first[:, :latent_width])
        if self.context is None:
            return y, hidden.new_zeros(0)
        return y, self.context.token_mean(hidden, first[:, latent_width:])


@dataclass(frozen=True)
class _IntegerSideNetwork:
    """The fixed-point h_s (Linear -> ReLU -> Linear on integers) evaluated in float64.

    Every product and partial sum is an integer below 2**53 (checked when it is built; the means are
    such integers times a power of two), so the result is exact whatever the summation order or
    library, hence identical on every machine.
    """

    side_weight: torch.Tensor  # (G, H)
    context_weight: torch.Tensor  # (Cc, H)
    bias: torch.Tensor  # (H,)
    mean_weight: torch.Tensor  # (H, C), in latent units
    mean_bias: torch.Tensor
    scale_weight: torch.Tensor  # (H, C), fixed-point log-scales
    scale_bias: torch.Tensor
    thresholds: torch.Tensor  # (scales - 1,) fixed-point log-scales between neighbouring scales
    largest_mean: float  # a bound on the means' magnitude over every input the tables allow

    def __call__(self, side: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Side values ``(T, G)`` and context values ``(Cc,)`` -> means ``(T, C)`` and scale indices ``(T, C)``."""
        # The context's share of the first layer is the same for every token: computed once. Row-vector
        # products rather than matrix-vector ones: one kernel fewer to come to from cold caches.
        return self._outputs(
            torch.addmm(torch.addmm(self.bias, context[None], self.context_weight), side, self.side_weight)
        )

    def per_sequence(
        self, side: torch.Tensor, contexts: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`__call__` for several sequences' tokens stacked: side values ``(sum T, G)``, one row of
        context values per sequence ``(N, Cc)``, and each sequence's token count ``(N,)``."""
        context_share = torch.addmm(self.bias, contexts, self.context_weight).repeat_interleave(counts, dim=0)
        return self._outputs(context_share.addmm_(side, self.side_weight))

    def _outputs(self, first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer's output ``(T, H)`` -> means and scale indices."""
        hidden = first.relu_()
        log_scale = torch.addmm(self.scale_bias, hidden, self.scale_weight)
        return torch.addmm(self.mean_bias, hidden, self.mean_weight), torch.searchsorted(self.thresholds, log_scale)


@dataclass(frozen=True)
class _TemporalPredictor:
    """The temporal prediction in fixed point, evaluated in float64.

    The previous token's latents are rounded to 1/2**TEMPORAL_INPUT_BITS and the weights are integers
    (units of 2**-FRACTION_BITS), so every partial sum is an integer below 2**52 (checked when it is
    built): the predictions, and the latents rebuilt from them, are the same on every machine.
    """

    weight: np.ndarray  # (C, C) float64 integers, input channel by output channel
    bound: float  # predictions are clamped to -bound .. bound

    def predict(self, previous: np.ndarray | None) -> np.ndarray:
        """The previous token's latents ``(C,)`` (None: no token before) -> the prediction added to this
        token's means."""
        if previous is None:
            return np.zeros(self.weight.shape[1])
        sums = np.round(previous * 2.0**TEMPORAL_INPUT_BITS) @ self.weight
        return np.clip(sums * 2.0 ** -(TEMPORAL_INPUT_BITS + FRACTION_BITS), -self.bound, self.bound)

    def quantise(
        self, y: np.ndarray, mean: np.ndarray, half: np.ndarray, previous: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The encoder's side: latents ``(T, C)``, the side network's means, each symbol's table half
        width and the decoded latents of the token before the first (None: zeros) -> the signed symbols,
        each token rounded against the prediction from the one before, and the last token's decoded
        latents (``previous`` when there are no tokens)."""
        symbols = np.empty_like(y)
        for t in range(y.shape[0]):
            token_mean = mean[t] + self.predict(previous)
            symbols[t] = np.clip(np.round(y[t] - token_mean), -half[t], half[t])
            previous = symbols[t] + token_mean
        return symbols, previous

    def reconstruct(self, symbols: np.ndarray, mean: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
        """The decoder's side: signed symbols ``(T, C)``, the side network's means and the decoded latents
        of the token before the first (None: zeros) -> the latents."""
        latents = np.empty_like(symbols)
        for t in range(symbols.shape[0]):
            previous = latents[t] = symbols[t] + (mean[t] + self.predict(previous))
        return latents


@dataclass(frozen=True)
class _CodingModels:
    """What coding needs, built once from the weights and tables."""

    context: np.ndarray  # (Cc, S) float64 counts, one row per channel: coded in one call
    context_sizes: list[int]  # (Cc,) each row's support
    side: list
    main: list
    side_range: _TableRange
    context_range: _TableRange
    half_widths: np.ndarray  # (scales,) each scale's table covers -half .. half
    side_network: _IntegerSideNetwork

    @property
    def half_widths_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.half_widths)

    # The transforms as coding runs them, the standardiser folded in.
    analysis: _Analysis
    side_analysis: FrozenLayers
    synthesis: FusedResidual
    temporal: _TemporalPredictor | None  # with a temporal prediction
    finite_output: bool  # no body decodes to NaN or infinity (proven from the bounds when built)


class HyperpriorCodec(LearnedCodec):
    kind = CodecKind.HYPERPRIOR
    module_class = HyperpriorModel

    def config(self) -> dict[str, object]:
        # Part of the fingerprint, so peers that code the same checkpoint differently refuse each other.
        return {**super().config(), "bitstream": BITSTREAM_REVISION}
