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
"""

from __future__ import annotations

import numpy as np
import torch
from splitwire.codec.base import CodecKind
from splitwire.codec.entropy import (
    CodedStream,
    DeepFactorizedDensity,
    ScaleTables,
    categorical,
    gaussian_likelihood,
    table_bits,
)
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
        }
        self.channels, self.side_channels = latent_channels, side_channels
        self.scale_min, self.scale_max = scale_min, scale_max
        self.standardize = Standardizer(width)
        self.g_a = ResidualTransform(width, latent_channels, hidden, layers)
        self.g_s = ResidualTransform(latent_channels, width, hidden, layers)
        self.h_a = TokenMLP(latent_channels, side_channels, hyper_hidden, 1, activation="relu")
        # Exactly Linear -> ReLU -> Linear: the integer version below mirrors this shape.
        self.h_s = TokenMLP(side_channels, 2 * latent_channels, hyper_hidden, 1, activation="relu")
        self.side_density = DeepFactorizedDensity(side_channels)
        self.gate = TokenGate(width) if token_gate else None
        self.scales = ScaleTables.default_scales(scale_count, scale_min, scale_max)
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
        self._models: tuple[list, list, tuple[np.ndarray, ...]] | None = None

    # -- training -------------------------------------------------------------------------------

    @torch.no_grad()
    def fit(self, samples: torch.Tensor) -> None:
        """Standardise with ``samples``' statistics and start the transforms as PCA onto the latent."""
        self.standardize.fit(samples)
        basis, std = principal_directions(self.standardize(samples), self.channels)
        self.g_a.init_linear(basis / std)
        self.g_s.init_linear((basis * std).t())

    def _mean_scale(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_scale = self.h_s(z_hat).chunk(2, dim=-1)
        return mean, torch.exp(log_scale).clamp(self.scale_min, self.scale_max)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.g_a(self.standardize(hidden))
        z = self.h_a(y)
        side_bits = -torch.log2(self.side_density.likelihood(quantize(z, QuantMode.NOISE))).sum(-1)
        mean, scale = self._mean_scale(quantize(z, QuantMode.STE))
        main_bits = -torch.log2(gaussian_likelihood(quantize(y, QuantMode.NOISE), mean, scale)).sum(-1)
        y_hat = quantize(y, QuantMode.STE, offset=mean)
        return self.standardize.inverse(self.g_s(y_hat)), main_bits + side_bits

    # -- integer tables and integer h_s ---------------------------------------------------------

    def update_tables(self) -> None:
        offsets, counts = self.side_density.to_tables()
        self.side_offsets, self.side_counts = torch.from_numpy(offsets), torch.from_numpy(counts)
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

    def _integer_mean_scale(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Integer side symbols ``(T, G)`` -> means ``(T, C)`` float64 and scale indices ``(T, C)``.

        Integer arithmetic carried out in float64: every product and partial sum is an integer below
        2**53 (checked when the tables are built), so the result is exact whatever the summation order,
        hence identical on every machine.
        """
        w1, b1, w2, b2 = self._float_side_network()
        hidden = np.maximum(z.astype(np.float64) @ w1 + b1, 0.0)
        out = hidden @ w2 + b2
        mean = out[:, : self.channels] / 2.0 ** (2 * FRACTION_BITS)
        index = np.searchsorted(self.scale_thresholds.numpy(), out[:, self.channels :], side="left")
        return mean, index

    def _float_side_network(self) -> tuple[np.ndarray, ...]:
        models = self._coding_models()
        return models[2]

    def _coding_models(self) -> tuple[list, list, tuple[np.ndarray, ...]]:
        if self._models is None:
            side = [categorical(row[row > 0]) for row in self.side_counts.numpy()]
            main = [categorical(row[row > 0]) for row in self.scale_counts.numpy()]
            self._models = (side, main, self._checked_side_network())
        return self._models

    def _checked_side_network(self) -> tuple[np.ndarray, ...]:
        """The integer h_s as float64 arrays, after proving its arithmetic stays exact."""
        w1, b1, w2, b2 = (t.numpy().astype(np.float64) for t in (self.hs_w1, self.hs_b1, self.hs_w2, self.hs_b2))
        lengths = (self.side_counts > 0).sum(1).numpy()
        offsets = self.side_offsets.numpy()
        largest_z = float(np.max(np.maximum(np.abs(offsets), np.abs(offsets + lengths - 1))))
        largest_hidden = largest_z * np.abs(w1).sum(1).max() + np.abs(b1).max()
        largest_out = largest_hidden * np.abs(w2).sum(1).max() + np.abs(b2).max()
        if largest_out >= 2.0**52:
            raise ValueError("side network weights are too large for exact fixed-point evaluation")
        return w1.T.copy(), b1, w2.T.copy(), b2

    def _symbols(self, hidden: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(T, D)`` -> side table indices ``(T, G)``, main symbols ``(T, C)``, scale indices ``(T, C)``."""
        y = self.g_a(self.standardize(hidden.float()))
        z = torch.round(self.h_a(y)).to(torch.int64).numpy()
        side_lengths = (self.side_counts > 0).sum(1).numpy()
        side_index = np.clip(z - self.side_offsets.numpy(), 0, side_lengths - 1)
        mean, scale_index = self._integer_mean_scale(side_index + self.side_offsets.numpy())
        half = self.scale_half_widths.numpy()[scale_index]
        main = np.clip(np.round(y.double().numpy() - mean), -half, half).astype(np.int64)
        return side_index, main, scale_index

    @staticmethod
    def _groups(scale_index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Main symbols grouped by scale index: flat positions in coding order, group indices, group sizes."""
        flat = scale_index.ravel()
        order = np.argsort(flat, kind="stable")
        present, sizes = np.unique(flat[order], return_counts=True)
        return order, present, sizes

    def compress(self, hidden: torch.Tensor) -> bytes:
        side_index, main, scale_index = self._symbols(hidden)
        side_models, main_models, _ = self._coding_models()
        half = self.scale_half_widths.numpy()
        order, present, sizes = self._groups(scale_index)
        values = main.ravel()[order]
        ends = np.cumsum(sizes)
        stream = CodedStream()
        # Side channels 0..G-1 first (the decoder needs them for the scales), then the main symbols
        # grouped by scale index, ascending.
        for g in range(self.side_channels):
            stream.push(side_index[:, g], side_models[g])
        for s, end, size in zip(present, ends, sizes, strict=True):
            stream.push(values[end - size : end] + half[s], main_models[s])
        return stream.to_bytes()

    def decompress(self, body: bytes | memoryview, tokens: int) -> torch.Tensor:
        side_models, main_models, _ = self._coding_models()
        half = self.scale_half_widths.numpy()
        stream = CodedStream(body)
        side_index = np.stack([stream.pop(tokens, side_models[g]) for g in range(self.side_channels)], axis=1)
        mean, scale_index = self._integer_mean_scale(side_index.astype(np.int64) + self.side_offsets.numpy())
        order, present, sizes = self._groups(scale_index)
        values = np.concatenate(
            [
                stream.pop(int(size), main_models[s]).astype(np.int64) - half[s]
                for s, size in zip(present, sizes, strict=True)
            ]
        )
        stream.finish()
        main = np.empty(tokens * self.channels, dtype=np.int64)
        main[order] = values
        y_hat = torch.from_numpy(main.reshape(tokens, self.channels) + mean).float()
        return self.standardize.inverse(self.g_s(y_hat))

    def estimate_bits(self, hidden: torch.Tensor) -> float:
        side_index, main, scale_index = self._symbols(hidden)
        side_counts, scale_counts = self.side_counts.numpy(), self.scale_counts.numpy()
        half = self.scale_half_widths.numpy()
        bits = sum(table_bits(side_counts[g], side_index[:, g]) for g in range(self.side_channels))
        for s in np.unique(scale_index):
            where = scale_index == s
            bits += table_bits(scale_counts[s], main[where] + half[s])
        return float(bits)


class HyperpriorCodec(LearnedCodec):
    kind = CodecKind.HYPERPRIOR
    module_class = HyperpriorModel
