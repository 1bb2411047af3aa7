"""The factorized codec: learned per-channel quantisation, an optional learned transform, and a
learned deep factorized density per latent channel (Ballé et al., ICLR 2017 and 2018).

::

    hidden (T, D) -standardise-> g_a -> / step -> y (T, C) -round-> y_hat -> * step -> g_s -> hidden_hat
                                                                  |
                                        DeepFactorizedDensity[c] -> integer table[c] -> range coder

Without a transform (``latent_channels=0``), ``g_a`` and ``g_s`` are the identity and ``C == D``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from splitwire.codec.base import CodecKind
from splitwire.codec.entropy import CodedStream, DeepFactorizedDensity, categorical, rounded_symbols, table_bits
from splitwire.codec.learned import (
    CodingModel,
    LearnedCodec,
    QuantMode,
    ResidualTransform,
    Standardizer,
    TokenGate,
    principal_directions,
    quantize,
)
from torch import nn


class FactorizedModel(CodingModel):
    def __init__(
        self, width: int, latent_channels: int = 0, hidden: int = 256, layers: int = 2, token_gate: bool = False
    ) -> None:
        super().__init__()
        self.config = {
            "width": width,
            "latent_channels": latent_channels,
            "hidden": hidden,
            "layers": layers,
            "token_gate": token_gate,
        }
        channels = latent_channels or width
        self.channels = channels
        self.standardize = Standardizer(width)
        if latent_channels:
            self.g_a: nn.Module = ResidualTransform(width, channels, hidden, layers)
            self.g_s: nn.Module = ResidualTransform(channels, width, hidden, layers)
        else:
            self.g_a = nn.Identity()
            self.g_s = nn.Identity()
        self.log_step = nn.Parameter(torch.zeros(channels))
        self.density = DeepFactorizedDensity(channels)
        self.gate = TokenGate(width) if token_gate else None
        self.register_buffer("table_offsets", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("table_counts", torch.zeros(0, 0, dtype=torch.int64))
        self._models: list | None = None

    # -- training -------------------------------------------------------------------------------

    @torch.no_grad()
    def fit(self, samples: torch.Tensor, latent_scale: float = 1.0, shared_step: bool = False) -> None:
        """Standardise with ``samples``' statistics and start the transforms as PCA onto the latent, with a
        quantisation step of 1 / ``latent_scale`` standard deviations."""
        if shared_step:
            raise ValueError("the factorized codec learns a step per latent channel; shared_step is for the hyperprior")
        self.standardize.fit(samples)
        with torch.no_grad():
            self.log_step.fill_(-math.log(latent_scale))
        if isinstance(self.g_a, ResidualTransform):
            basis, std = principal_directions(self.standardize(samples), self.channels)
            self.g_a.init_linear(basis / std)
            self.g_s.init_linear((basis * std).t())

    def analysis(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.g_a(self.standardize(hidden)) / torch.exp(self.log_step)

    def synthesis(self, y_hat: torch.Tensor) -> torch.Tensor:
        return self.standardize.inverse(self.g_s(y_hat * torch.exp(self.log_step)))

    def forward(
        self, hidden: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.analysis(hidden)
        bits = -torch.log2(self.density.likelihood(quantize(y, QuantMode.NOISE))).sum(-1)
        return self.synthesis(quantize(y, QuantMode.STE)), bits

    # -- coding ---------------------------------------------------------------------------------

    def update_tables(self) -> None:
        offsets, counts = self.density.to_tables()
        self.table_offsets = torch.from_numpy(offsets)
        self.table_counts = torch.from_numpy(counts)
        self._models = None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        self._models = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _coding_models(self) -> list:
        if self._models is None:
            counts = self.table_counts.numpy()
            self._models = [categorical(row[row > 0]) for row in counts]
        return self._models

    def _symbols(self, hidden: torch.Tensor) -> np.ndarray:
        """``(T, D)`` -> table indices ``(T, C)``, clamped to each channel's support."""
        y = rounded_symbols(self.analysis(hidden.float()))
        lengths = (self.table_counts > 0).sum(1).numpy()
        return np.clip(y - self.table_offsets.numpy(), 0, lengths - 1)

    def compress(self, hidden: torch.Tensor) -> bytes:
        indices = self._symbols(hidden)
        models = self._coding_models()
        stream = CodedStream()
        for c in range(self.channels):
            stream.push(indices[:, c], models[c])
        return stream.to_bytes()

    def decompress(self, body: bytes | memoryview, tokens: int) -> torch.Tensor:
        models = self._coding_models()
        stream = CodedStream(body)
        columns = [stream.pop(tokens, models[c]) for c in range(self.channels)]
        stream.finish()
        indices = np.stack(columns, axis=1).astype(np.int64) if columns else np.zeros((tokens, 0), np.int64)
        y_hat = torch.from_numpy(indices + self.table_offsets.numpy()).float()
        return self.synthesis(y_hat)

    def estimate_bits(self, hidden: torch.Tensor) -> float:
        indices = self._symbols(hidden)
        counts = self.table_counts.numpy()
        return sum(table_bits(counts[c], indices[:, c]) for c in range(self.channels))


class FactorizedCodec(LearnedCodec):
    kind = CodecKind.FACTORIZED
    module_class = FactorizedModel
