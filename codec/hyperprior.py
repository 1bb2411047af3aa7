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

With ``raw_token_threshold > 0``, a token whose largest absolute value exceeds the threshold is sent
apart, as float16, ahead of the coded stream. Decoder LMs put activations in the tens of thousands on a
few tokens (the attention sink, usually the first token); no Gaussian table covers those, and
letting them into the statistics would flatten every other token's standardised values.
"""

from __future__ import annotations

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
FLOAT16_MAX = 65504.0


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
    ) -> None:
        super().__init__()
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
            self.g_c = ResidualTransform(width, context_channels, hidden, layers)
            self.context_density = DeepFactorizedDensity(context_channels)
        self.gate = TokenGate(width) if token_gate else None
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
    def fit(self, samples: torch.Tensor, latent_scale: float = 1.0) -> None:
        """Standardise with ``samples``' statistics and start the transforms as PCA onto the latent:
        whitened components times ``latent_scale`` (rounding then starts at 1 / latent_scale standard
        deviations; a finer start suits distortions that punish small errors, such as an LM's KL)."""
        samples = samples[~self.raw_tokens(samples)]
        self.standardize.fit(samples)
        basis, std = principal_directions(self.standardize(samples), self.channels)
        self.g_a.init_linear(basis / std * latent_scale)
        # The context starts with no say in the reconstruction; training gives it one.
        synthesis = torch.cat([(basis * std).t() / latent_scale, torch.zeros(self.context_channels, basis.shape[0])])
        self.g_s.init_linear(synthesis)
        if self.context_channels:
            context_basis, context_std = principal_directions(self.standardize(samples), self.context_channels)
            self.g_c.init_linear(context_basis / context_std)

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
        bits = bits - torch.log2(gaussian_likelihood(quantize(y, QuantMode.NOISE), mean, scale)).sum(-1)
        y_hat = quantize(y, QuantMode.STE, offset=mean)
        hidden_hat = self.standardize.inverse(self.g_s(torch.cat([y_hat, *synthesis_extra], dim=-1)))
        if self.raw_token_threshold:
            exact = hidden.clamp(-FLOAT16_MAX, FLOAT16_MAX).half().to(hidden.dtype)
            hidden_hat = torch.where(raw.unsqueeze(-1), exact, hidden_hat)
            bits = torch.where(raw, torch.full_like(bits, self.raw_token_bits()), bits)
        return hidden_hat, bits

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
        self._models = None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        self._models = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- coding ---------------------------------------------------------------------------------

    def _coding_models(self) -> _CodingModels:
        if self._models is None:
            self._models = _CodingModels(
                context=self.context_counts.numpy().astype(np.float64),
                context_sizes=(self.context_counts > 0).sum(1).numpy(),
                side=[categorical(row[row > 0]) for row in self.side_counts.numpy()],
                side_sizes=(self.side_counts > 0).sum(1).numpy(),
                main=[categorical(row[row > 0]) for row in self.scale_counts.numpy()],
                side_network=self._checked_side_network(),
            )
        return self._models

    def _checked_side_network(self) -> tuple[np.ndarray, ...]:
        """The integer h_s as float64 arrays, after proving its arithmetic stays exact."""
        w1, b1, w2, b2 = (t.numpy().astype(np.float64) for t in (self.hs_w1, self.hs_b1, self.hs_w2, self.hs_b2))
        largest_input = 0.0
        for offsets, counts in ((self.side_offsets, self.side_counts), (self.context_offsets, self.context_counts)):
            if offsets.numel():
                last = offsets.numpy() + (counts > 0).sum(1).numpy() - 1
                largest_input = max(largest_input, float(np.max(np.maximum(np.abs(offsets.numpy()), np.abs(last)))))
        largest_hidden = largest_input * np.abs(w1).sum(1).max() + np.abs(b1).max()
        largest_out = largest_hidden * np.abs(w2).sum(1).max() + np.abs(b2).max()
        if largest_out >= 2.0**52:
            raise ValueError("side network weights are too large for exact fixed-point evaluation")
        return w1.T.copy(), b1, w2.T.copy(), b2

    def _integer_mean_scale(self, side: np.ndarray, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Side symbols ``(T, G)`` and context symbols ``(Cc,)`` (integers) -> means ``(T, C)`` float64
        and scale indices ``(T, C)``.

        Integer arithmetic carried out in float64: every product and partial sum is an integer below
        2**53 (checked when the tables are built), so the result is exact whatever the summation order,
        hence identical on every machine.
        """
        w1, b1, w2, b2 = self._coding_models().side_network
        # The context's share of the first layer is the same for every token: computed once. Exact
        # integers either way, so splitting the sum changes no bit.
        shared = context.astype(np.float64) @ w1[self.side_channels :] + b1
        hidden = np.maximum(side.astype(np.float64) @ w1[: self.side_channels] + shared, 0.0)
        out = hidden @ w2 + b2
        mean = out[:, : self.channels] / 2.0 ** (2 * FRACTION_BITS)
        index = np.searchsorted(self.scale_thresholds.numpy(), out[:, self.channels :], side="left")
        return mean, index

    @staticmethod
    def _table_index(values: torch.Tensor, offsets: torch.Tensor, sizes: np.ndarray) -> np.ndarray:
        """Round ``values`` and clamp them into each channel's table: indices into the tables."""
        return np.clip(np.rint(values.numpy()).astype(np.int64) - offsets.numpy(), 0, sizes - 1)

    def _symbols(self, hidden: torch.Tensor) -> _Symbols:
        models = self._coding_models()
        x = self.standardize(hidden.float())
        y = self.g_a(x)
        side = self._table_index(self.h_a(y), self.side_offsets, models.side_sizes)
        context = np.zeros(0, dtype=np.int64)
        if self.context_channels:
            context = self._table_index(self.g_c.token_mean(x), self.context_offsets, models.context_sizes)
        mean, scale_index = self._integer_mean_scale(
            side + self.side_offsets.numpy(), context + self.context_offsets.numpy()
        )
        half = self.scale_half_widths.numpy()[scale_index]
        main = np.clip(np.round(y.double().numpy() - mean), -half, half).astype(np.int64)
        return _Symbols(context, side, main, scale_index)

    @staticmethod
    def _groups(scale_index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Main symbols grouped by scale index: flat positions in coding order, group indices, group sizes."""
        flat = scale_index.ravel()
        order = np.argsort(flat, kind="stable")
        present, sizes = np.unique(flat[order], return_counts=True)
        return order, present, sizes

    def compress(self, hidden: torch.Tensor) -> bytes:
        if not self.raw_token_threshold:
            return self._compress_coded(hidden)
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
            out += self._compress_coded(hidden[~raw])
        return bytes(out)

    def decompress(self, body: bytes | memoryview, tokens: int) -> torch.Tensor:
        if not self.raw_token_threshold:
            return self._decompress_coded(body, tokens)
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
            hidden[torch.from_numpy(coded)] = self._decompress_coded(rest, tokens - count)
        elif len(rest):
            raise BitstreamError(f"{len(rest)} bytes after the last raw token of a payload with no coded tokens")
        hidden[indices] = torch.from_numpy(rows.astype(np.float32))
        return hidden

    def _compress_coded(self, hidden: torch.Tensor) -> bytes:
        symbols = self._symbols(hidden)
        models = self._coding_models()
        half = self.scale_half_widths.numpy()
        order, present, sizes = self._groups(symbols.scale_index)
        values = symbols.main.ravel()[order]
        ends = np.cumsum(sizes)
        stream = CodedStream()
        # What the decoder needs first comes first: the context, the side channels 0..G-1, then the
        # main symbols grouped by scale index, ascending.
        stream.push_rows(symbols.context, TABLE_FAMILY, models.context)
        for g in range(self.side_channels):
            stream.push(symbols.side[:, g], models.side[g])
        for s, end, size in zip(present, ends, sizes, strict=True):
            stream.push(values[end - size : end] + half[s], models.main[s])
        return stream.to_bytes()

    def _decompress_coded(self, body: bytes | memoryview, tokens: int) -> torch.Tensor:
        models = self._coding_models()
        half = self.scale_half_widths.numpy()
        stream = CodedStream(body)
        context = np.zeros(0, dtype=np.int64)
        if self.context_channels:
            context = stream.pop_rows(TABLE_FAMILY, models.context).astype(np.int64)
            if (context >= models.context_sizes).any():
                raise BitstreamError("a context symbol lies outside its channel's table")
        side = np.stack([stream.pop(tokens, models.side[g]) for g in range(self.side_channels)], axis=1)
        context_values = context + self.context_offsets.numpy()
        mean, scale_index = self._integer_mean_scale(side.astype(np.int64) + self.side_offsets.numpy(), context_values)
        order, present, sizes = self._groups(scale_index)
        values = np.concatenate(
            [
                stream.pop(int(size), models.main[s]).astype(np.int64) - half[s]
                for s, size in zip(present, sizes, strict=True)
            ]
        )
        stream.finish()
        main = np.empty(tokens * self.channels, dtype=np.int64)
        main[order] = values
        y_hat = torch.from_numpy(main.reshape(tokens, self.channels) + mean).float()
        return self.standardize.inverse(self.g_s.forward_shared(y_hat, torch.from_numpy(context_values).float()))

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
        half = self.scale_half_widths.numpy()
        bits = sum(table_bits(context_counts[c], symbols.context[c : c + 1]) for c in range(self.context_channels))
        bits += sum(table_bits(side_counts[g], symbols.side[:, g]) for g in range(self.side_channels))
        for s in np.unique(symbols.scale_index):
            where = symbols.scale_index == s
            bits += table_bits(scale_counts[s], symbols.main[where] + half[s])
        return float(bits)


@dataclass(frozen=True)
class _Symbols:
    """One sequence's symbols: context and side as table indices, main as signed values."""

    context: np.ndarray  # (Cc,)
    side: np.ndarray  # (T, G)
    main: np.ndarray  # (T, C)
    scale_index: np.ndarray  # (T, C)


@dataclass(frozen=True)
class _CodingModels:
    context: np.ndarray  # (Cc, S) float64 counts, one row per channel: coded in one call
    context_sizes: np.ndarray  # (Cc,) each row's support
    side: list
    side_sizes: np.ndarray  # (G,)
    main: list
    side_network: tuple[np.ndarray, ...]


class HyperpriorCodec(LearnedCodec):
    kind = CodecKind.HYPERPRIOR
    module_class = HyperpriorModel

    def config(self) -> dict[str, object]:
        # Part of the fingerprint, so peers that code the same checkpoint differently refuse each other.
        return {**super().config(), "bitstream": BITSTREAM_REVISION}
