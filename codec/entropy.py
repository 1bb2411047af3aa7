"""Entropy models and the integer tables they are coded with.

Training sees differentiable likelihoods; coding sees integer probability tables built once by
``to_tables()`` and stored in the checkpoint, so encoder and decoder use identical numbers on any
machine. Symbols go to constriction's range coder a whole array per call.

* :class:`DeepFactorizedDensity` -- Ballé et al., "Variational image compression with a scale
  hyperprior" (ICLR 2018), appendix 6.1: a per-channel univariate CDF ``sigmoid(f(x))`` with ``f``
  a small monotonic network.
* :func:`gaussian_likelihood` -- a Gaussian convolved with a unit box, for the hyperprior's main latent.
* :class:`ScaleTables` -- zero-mean discretised Gaussians at fixed scales (CompressAI's scale table).
* :class:`CodedStream` -- one range-coded stream per payload, serialised with trailing zero bytes trimmed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import constriction
import numpy as np
import torch
import torch.nn.functional as F
from splitwire.codec.errors import BitstreamError
from torch import nn

PRECISION_BITS = 16  # integer tables sum to 2**16
LIKELIHOOD_FLOOR = 1e-9
TAIL_MASS = 1e-9


# -- integer probability tables -----------------------------------------------------------------


def quantize_pmf(pmf: np.ndarray, precision_bits: int = PRECISION_BITS) -> np.ndarray:
    """Float pmf (sums to ~1) -> int64 counts, every entry >= 1, summing exactly to 2**precision_bits."""
    total = 1 << precision_bits
    n = len(pmf)
    if n > total // 2:
        raise ValueError(f"support of {n} symbols is too large for {precision_bits}-bit tables")
    pmf = np.clip(np.asarray(pmf, dtype=np.float64), 0.0, None)
    pmf = pmf / pmf.sum()
    counts = np.maximum(1, np.floor(pmf * (total - n)).astype(np.int64) + 1)
    # Hand the rounding remainder to (or take it from) the most probable symbols, keeping each >= 1.
    diff = total - int(counts.sum())
    order = np.argsort(-pmf, kind="stable")
    i = 0
    while diff != 0:
        j = order[i % n]
        step = 1 if diff > 0 else -1
        if counts[j] + step >= 1:
            counts[j] += step
            diff -= step
        i += 1
    return counts


def rounded_symbols(values: torch.Tensor) -> np.ndarray:
    """``values`` rounded to the nearest integers, as int64 NumPy; ValueError if any is NaN or infinite.

    PyTorch turns NaN and infinity into the most negative int64, which clamping into a table would then
    hide: the payload would decode to the wrong values without a word."""
    rounded = torch.round(values)
    if not torch.isfinite(rounded).all():
        raise ValueError("cannot quantize NaN or infinity: the hidden states hold non-finite values")
    return rounded.to(torch.int64).numpy()


def table_bits(counts: np.ndarray, symbols: np.ndarray, precision_bits: int = PRECISION_BITS) -> float:
    """Ideal code length in bits of ``symbols`` (indices into ``counts``)."""
    return float(np.sum(precision_bits - np.log2(counts[symbols].astype(np.float64))))


def categorical(counts: np.ndarray) -> constriction.stream.model.Categorical:
    """A constriction model for integer ``counts``; exact inputs give the same model everywhere."""
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


# -- the coded stream ------------------------------------------------------------------------------


def _uncodable(exc: KeyError) -> ValueError:
    """constriction's refusal of a symbol its table cannot code, as a ValueError that says why."""
    reason = exc.args[0] if exc.args else exc  # "Tried to encode symbol that has zero probability ..."
    return ValueError(
        f"cannot entropy-code these values ({reason}); NaN or infinity in the hidden states is the usual cause"
    )


class CodedStream:
    """One range-coded stream per payload: symbols are pushed and popped in the same order (a queue).

    A range coder ends about a byte closer to the ideal code length than constriction's ANS coder
    does, which matters for payloads of a few dozen bytes. Serialisation: constriction's uint32 words,
    little-endian, with trailing zero bytes of the last word dropped (the reader pads them back).
    """

    def __init__(self, body: bytes | memoryview | None = None) -> None:
        if body is None:
            self._encoder: constriction.stream.queue.RangeEncoder | None = constriction.stream.queue.RangeEncoder()
            self._decoder = None
            return
        data = bytes(body)
        if len(data) % 4:
            data += b"\0" * (4 - len(data) % 4)
        words = np.frombuffer(data, dtype="<u4").astype(np.uint32, copy=False)  # a copy only on big-endian hosts
        self._encoder = None
        try:
            self._decoder = constriction.stream.queue.RangeDecoder(words)
        except ValueError as exc:
            raise BitstreamError(f"invalid entropy-coded data: {exc}") from None

    def push(self, symbols: np.ndarray, model: constriction.stream.model.Categorical) -> None:
        """Encode ``symbols`` (indices into the model's table)."""
        assert self._encoder is not None, "push() on a stream opened for reading"
        if symbols.size:
            try:  # free unless it raises, unlike a context manager on this per-group path
                self._encoder.encode(np.ascontiguousarray(symbols, dtype=np.int32), model)
            except KeyError as exc:
                raise _uncodable(exc) from None

    def pop(self, count: int, model: constriction.stream.model.Categorical) -> np.ndarray:
        """Decode ``count`` symbols pushed with ``model``."""
        assert self._decoder is not None, "pop() on a stream opened for writing"
        if count == 0:
            return np.zeros(0, dtype=np.int32)
        try:
            return self._decoder.decode(model, count)
        except (ValueError, RuntimeError, AssertionError) as exc:  # constriction's errors for undecodable data
            raise BitstreamError(f"entropy decoding failed: {exc}") from None

    def push_rows(self, symbols: np.ndarray, family: object, probabilities: np.ndarray) -> None:
        """Encode ``symbols`` ``(N,)``, each with its own row of ``probabilities`` ``(N, S)``."""
        assert self._encoder is not None, "push_rows() on a stream opened for reading"
        if symbols.size:
            try:
                self._encoder.encode(np.ascontiguousarray(symbols, dtype=np.int32), family, probabilities)
            except KeyError as exc:
                raise _uncodable(exc) from None

    def pop_rows(self, family: object, probabilities: np.ndarray) -> np.ndarray:
        assert self._decoder is not None, "pop_rows() on a stream opened for writing"
        try:
            return self._decoder.decode(family, probabilities)
        except (ValueError, RuntimeError, AssertionError) as exc:  # constriction's errors for undecodable data
            raise BitstreamError(f"entropy decoding failed: {exc}") from None

    def to_bytes(self) -> bytes:
        assert self._encoder is not None
        data = self._encoder.get_compressed().astype("<u4").tobytes()
        trimmed = data.rstrip(b"\0")
        return data[: max(len(trimmed), len(data) - 3)]

    def finish(self) -> None:
        """Check that decoding consumed the coded data (garbage often does not)."""
        assert self._decoder is not None
        if not self._decoder.maybe_exhausted():
            raise BitstreamError("entropy-coded data has bits left over after the last symbol")


# -- the learned factorized density -----------------------------------------------------------


class DeepFactorizedDensity(nn.Module):
    """A learned univariate density per channel (Ballé et al. 2018, appendix 6.1).

    ``cdf(x) = sigmoid(f_K(...f_1(x)))`` where each ``f_k(x) = H_k x + b_k`` (``H_k`` >= 0 via
    softplus) followed by ``x + tanh(a_k) * tanh(x)``: monotonic in ``x`` by construction.
    """

    def __init__(self, channels: int, filters: Sequence[int] = (3, 3, 3), init_scale: float = 10.0) -> None:
        super().__init__()
        self.channels = channels
        widths = (1, *filters, 1)
        scale = init_scale ** (1.0 / (len(widths) - 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(widths) - 1):
            init = math.log(math.expm1(1.0 / scale / widths[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, widths[i + 1], widths[i]), init)))
            self.biases.append(nn.Parameter(torch.empty(channels, widths[i + 1], 1).uniform_(-0.5, 0.5)))
            if i < len(widths) - 2:
                self.factors.append(nn.Parameter(torch.zeros(channels, widths[i + 1], 1)))

    def _logits_cdf(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(C, 1, N)`` -> logits of the CDF ``(C, 1, N)``."""
        for i, (matrix, bias) in enumerate(zip(self.matrices, self.biases, strict=True)):
            x = torch.matmul(F.softplus(matrix), x) + bias
            if i < len(self.factors):
                x = x + torch.tanh(self.factors[i]) * torch.tanh(x)
        return x

    def likelihood(self, y: torch.Tensor) -> torch.Tensor:
        """Probability of the unit interval around each value: ``y`` ``(..., C)`` -> same shape."""
        shape = y.shape
        values = y.reshape(-1, self.channels).t().unsqueeze(1)  # (C, 1, N)
        lower = self._logits_cdf(values - 0.5)
        upper = self._logits_cdf(values + 0.5)
        # Evaluate on the side of the median where the sigmoid is not saturated.
        sign = -torch.sign(lower + upper).detach()
        lik = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        return lik.clamp_min(LIKELIHOOD_FLOOR).squeeze(1).t().reshape(shape)

    @torch.no_grad()
    def to_tables(self, search_range: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """Integer tables for coding: ``offsets`` ``(C,)`` (the smallest symbol of each channel) and
        ``counts`` ``(C, S)`` (0-padded to the widest support; each channel's tail mass is folded
        into its end symbols)."""
        grid = torch.arange(-search_range, search_range + 1, dtype=torch.float32)
        cdf = torch.sigmoid(self._logits_cdf(grid.view(1, 1, -1).expand(self.channels, 1, -1) + 0.5)).squeeze(1)
        cdf = cdf.double().numpy()  # (C, G): P(X <= k + 0.5)
        offsets, tables = [], []
        for c in range(self.channels):
            lo = int(np.searchsorted(cdf[c], TAIL_MASS / 2))
            hi = int(np.searchsorted(cdf[c], 1 - TAIL_MASS / 2))
            lo, hi = min(lo, len(grid) - 2), min(max(hi, lo), len(grid) - 1)
            # At least two symbols: a channel whose density collapsed onto one value codes in almost no
            # bits either way, and a one-symbol table is not a distribution the range coder accepts.
            hi = max(hi, lo + 1)
            upper = cdf[c, lo : hi + 1].copy()
            upper[-1] = 1.0
            pmf = np.diff(np.concatenate([[0.0], upper]))
            offsets.append(int(grid[lo]))
            tables.append(quantize_pmf(pmf))
        width = max(len(t) for t in tables)
        counts = np.zeros((self.channels, width), dtype=np.int64)
        for c, table in enumerate(tables):
            counts[c, : len(table)] = table
        return np.asarray(offsets, dtype=np.int64), counts


def gaussian_likelihood(y: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """P(|Y - y| < 0.5) for Y ~ N(mean, scale): the density of a discretised Gaussian."""
    # Evaluate on the lower tail (|y - mean| folded), where the CDF does not saturate to 1.
    centered = torch.abs(y - mean)
    lik = _std_normal_cdf((0.5 - centered) / scale) - _std_normal_cdf((-0.5 - centered) / scale)
    return lik.clamp_min(LIKELIHOOD_FLOOR)


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-x / math.sqrt(2.0))


class ScaleTables:
    """Zero-mean discretised Gaussians at ``scales``, as integer tables over ``[-K_s, K_s]``."""

    def __init__(self, scales: np.ndarray, tail_sigmas: float = 6.0) -> None:
        self.scales = np.asarray(scales, dtype=np.float64)
        self.half_widths = np.ceil(self.scales * tail_sigmas).astype(np.int64) + 1
        self.tables: list[np.ndarray] = []
        for scale, k in zip(self.scales, self.half_widths, strict=True):
            edges = (np.arange(-k, k + 2) - 0.5) / scale
            cdf = 0.5 * np.array([math.erfc(-e / math.sqrt(2.0)) for e in edges])
            cdf[0], cdf[-1] = 0.0, 1.0  # fold the tails into the end symbols
            self.tables.append(quantize_pmf(np.diff(cdf)))
        self.models = [categorical(t) for t in self.tables]

    @staticmethod
    def default_scales(count: int = 64, smallest: float = 0.11, largest: float = 64.0) -> np.ndarray:
        return np.exp(np.linspace(math.log(smallest), math.log(largest), count))
