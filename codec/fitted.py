"""Non-learned baselines whose statistics are fitted on training hidden states (no gradient training).

* ``uniform`` -- per-channel scalar quantisation (step = ``step`` x the channel's standard deviation)
  with an adaptive per-channel model: counts start from a prior fitted on training data and are
  updated after every token, on both sides, as the sequence is coded.

  ::

      hidden (T, D) -standardise-> / step -> round -> symbols (T, D) -> range coder, token by token,
                                                       with counts[c] += 1 observation per token

* ``pca`` -- the top ``components`` principal directions of the training hidden states, uniform
  quantisation of each coefficient (step = ``step`` x its standard deviation), static per-component
  tables fitted on training data.

  ::

      hidden (T, D) - mean -> @ basis (D, K) -> / (step * std_k) -> round -> range coder per component
"""

from __future__ import annotations

import math

import constriction
import numpy as np
import torch
from splitwire.codec.base import CodecKind
from splitwire.codec.entropy import CodedStream, categorical, quantize_pmf, rounded_symbols, table_bits
from splitwire.codec.learned import CodingModel, LearnedCodec, Standardizer

PRIOR_TOTAL = 1 << 12  # each channel's prior counts sum to this


def _half_width(step: float, sigmas: float = 6.0) -> int:
    """Symbols span [-K, K] with K covering ``sigmas`` standard deviations."""
    return max(1, math.ceil(sigmas / step))


def _histogram_tables(symbols: np.ndarray, half_width: int, total_bits: int = 16) -> np.ndarray:
    """``symbols`` ``(N, C)`` in [-K, K] -> integer tables ``(C, 2K+1)`` (add-one smoothed)."""
    size = 2 * half_width + 1
    tables = np.zeros((symbols.shape[1], size), dtype=np.int64)
    for c in range(symbols.shape[1]):
        counts = np.bincount(symbols[:, c] + half_width, minlength=size).astype(np.float64) + 1.0
        tables[c] = quantize_pmf(counts / counts.sum(), total_bits)
    return tables


class UniformModel(CodingModel):
    def __init__(self, width: int, step: float = 0.5, prior_observations: int = 32) -> None:
        super().__init__()
        self.config = {"width": width, "step": step, "prior_observations": prior_observations}
        self.step = step
        self.half_width = _half_width(step)
        self.increment = PRIOR_TOTAL // prior_observations
        self.standardize = Standardizer(width)
        self.register_buffer("prior_counts", torch.ones(width, 2 * self.half_width + 1, dtype=torch.int64))
        self._family = constriction.stream.model.Categorical(perfect=False)

    @torch.no_grad()
    def fit(self, samples: torch.Tensor) -> None:
        """``samples`` ``(N, D)``: hidden states of real training tokens."""
        self.standardize.fit(samples)
        self.prior_counts = torch.from_numpy(_histogram_tables(self._symbols(samples), self.half_width, 12))

    def update_tables(self) -> None:  # the tables are the fitted prior
        pass

    def _symbols(self, hidden: torch.Tensor) -> np.ndarray:
        y = rounded_symbols(self.standardize(hidden.float()) / self.step)
        return np.clip(y, -self.half_width, self.half_width)

    def _reconstruct(self, symbols: np.ndarray) -> torch.Tensor:
        return self.standardize.inverse(torch.from_numpy(symbols).float() * self.step)

    def _count_states(self, indices: np.ndarray) -> np.ndarray:
        """Counts each token is coded with: the prior plus every earlier token, ``(T, D, 2K+1)``."""
        tokens, width = indices.shape
        seen = np.zeros((tokens, width, self.prior_counts.shape[1]), dtype=np.int64)
        seen[np.arange(tokens)[:, None], np.arange(width)[None, :], indices] = self.increment
        before = np.cumsum(seen, axis=0) - seen
        return self.prior_counts.numpy()[None] + before

    def forward(
        self, hidden: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("the uniform baseline is fitted, not trained")

    def compress(self, hidden: torch.Tensor) -> bytes:
        indices = self._symbols(hidden) + self.half_width
        states = self._count_states(indices).astype(np.float64)
        stream = CodedStream()
        for t in range(indices.shape[0]):
            stream.push_rows(indices[t], self._family, states[t])
        return stream.to_bytes()

    def decompress(self, body: bytes | memoryview, tokens: int) -> torch.Tensor:
        stream = CodedStream(body)
        counts = self.prior_counts.numpy().copy()
        width = counts.shape[0]
        indices = np.zeros((tokens, width), dtype=np.int64)
        for t in range(tokens):
            indices[t] = stream.pop_rows(self._family, counts.astype(np.float64))
            counts[np.arange(width), indices[t]] += self.increment
        stream.finish()
        return self._reconstruct(indices - self.half_width)

    def estimate_bits(self, hidden: torch.Tensor) -> float:
        indices = self._symbols(hidden) + self.half_width
        states = self._count_states(indices)
        chosen = np.take_along_axis(states, indices[..., None], axis=2)[..., 0]
        return float(np.sum(np.log2(states.sum(axis=2)) - np.log2(chosen)))


class PcaModel(CodingModel):
    def __init__(self, width: int, components: int = 64, step: float = 0.5) -> None:
        super().__init__()
        self.config = {"width": width, "components": components, "step": step}
        self.components, self.step = components, step
        self.half_width = _half_width(step)
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("basis", torch.zeros(width, components))
        self.register_buffer("component_std", torch.ones(components))
        self.register_buffer("table_counts", torch.ones(components, 2 * self.half_width + 1, dtype=torch.int64))
        self._models: list | None = None

    @torch.no_grad()
    def fit(self, samples: torch.Tensor) -> None:
        samples = samples.double()
        mean = samples.mean(0)
        _, _, vh = torch.linalg.svd(samples - mean, full_matrices=False)
        basis = vh[: self.components].t()
        # Fix each direction's sign so the fit is reproducible.
        basis = basis * torch.sign(basis[basis.abs().argmax(0), torch.arange(self.components)])
        coefficients = (samples - mean) @ basis
        self.mean, self.basis = mean.float(), basis.float().contiguous()
        self.component_std = coefficients.std(0).clamp_min(1e-6).float()
        self.table_counts = torch.from_numpy(_histogram_tables(self._symbols(samples.float()), self.half_width))
        self._models = None

    def update_tables(self) -> None:
        self._models = None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        self._models = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _symbols(self, hidden: torch.Tensor) -> np.ndarray:
        y = ((hidden.float() - self.mean) @ self.basis) / (self.component_std * self.step)
        return np.clip(rounded_symbols(y), -self.half_width, self.half_width)

    def _coding_models(self) -> list:
        if self._models is None:
            self._models = [categorical(row) for row in self.table_counts.numpy()]
        return self._models

    def forward(
        self, hidden: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("the pca baseline is fitted, not trained")

    def compress(self, hidden: torch.Tensor) -> bytes:
        indices = self._symbols(hidden) + self.half_width
        models = self._coding_models()
        stream = CodedStream()
        for k in range(self.components):
            stream.push(indices[:, k], models[k])
        return stream.to_bytes()

    def decompress(self, body: bytes | memoryview, tokens: int) -> torch.Tensor:
        models = self._coding_models()
        stream = CodedStream(body)
        columns = [stream.pop(tokens, models[k]) for k in range(self.components)]
        stream.finish()
        symbols = np.stack(columns, axis=1).astype(np.int64) - self.half_width
        coefficients = torch.from_numpy(symbols).float() * self.component_std * self.step
        return self.mean + coefficients @ self.basis.t()

    def estimate_bits(self, hidden: torch.Tensor) -> float:
        indices = self._symbols(hidden) + self.half_width
        counts = self.table_counts.numpy()
        return sum(table_bits(counts[k], indices[:, k]) for k in range(self.components))


class UniformCodec(LearnedCodec):
    kind = CodecKind.UNIFORM
    module_class = UniformModel


class PcaCodec(LearnedCodec):
    kind = CodecKind.PCA
    module_class = PcaModel
