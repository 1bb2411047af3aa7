"""What the learned codecs share: quantisation modes, per-token transforms, checkpoints on disk.

A learned codec is an ``nn.Module`` (trained with likelihoods) wrapped by a :class:`~splitwire.codec.base.Codec`
(coding with integer tables). Checkpoints are safetensors files: the module's tensors plus the integer
tables, with the configuration as JSON metadata.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from splitwire.codec import container
from splitwire.codec.base import Codec, CodecKind
from splitwire.codec.errors import BitstreamError, each_or_error
from torch import nn

if TYPE_CHECKING:
    from splitwire.codec.catalog import CheckpointEntry


class QuantMode(enum.Enum):
    """How a latent is made discrete."""

    NOISE = "noise"  # add U(-0.5, 0.5): the differentiable proxy for the rate during training
    STE = "ste"  # round forward, identity backward: what the decoder will see, with gradients
    ROUND = "round"  # round: inference


def quantize(y: torch.Tensor, mode: QuantMode, offset: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Quantise ``y`` to integers around ``offset`` (a predicted mean, or 0)."""
    if mode is QuantMode.NOISE:
        return y + torch.empty_like(y).uniform_(-0.5, 0.5)
    rounded = torch.round(y - offset) + offset
    if mode is QuantMode.STE:
        return y + (rounded - y).detach()
    return rounded


ACTIVATIONS: dict[str, tuple[type[nn.Module], Callable[[torch.Tensor], torch.Tensor]]] = {
    "gelu": (nn.GELU, F.gelu),
    "relu": (nn.ReLU, F.relu),
}


class TokenMLP(nn.Module):
    """A per-token MLP ``(..., in_dim) -> (..., out_dim)``; with ``hidden == 0`` a single linear map."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, layers: int = 2, activation: str = "gelu") -> None:
        super().__init__()
        self.activation = activation
        act = ACTIVATIONS[activation][0]
        modules: list[nn.Module] = []
        width = in_dim
        if hidden:
            for _ in range(layers):
                modules += [nn.Linear(width, hidden), act()]
                width = hidden
        modules.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def frozen(self) -> FrozenLayers:
        """This MLP for coding, as plain tensor operations."""
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        return FrozenLayers(
            tuple(linear.weight.t().contiguous() for linear in linears),
            tuple(linear.bias.clone() for linear in linears),
            ACTIVATIONS[self.activation][1],
        )


@dataclass(frozen=True)
class FrozenLayers:
    """Linear layers with an activation after each but the last, run as plain tensor operations: at a
    few dozen tokens a module call costs about as much as the product it wraps."""

    weights: tuple[torch.Tensor, ...]  # (in, out) each
    biases: tuple[torch.Tensor, ...]
    activation: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(T, in)`` -> ``(T, out)``."""
        for weight, bias in zip(self.weights[:-1], self.biases[:-1], strict=True):
            x = self.activation(torch.addmm(bias, x, weight))
        return torch.addmm(self.biases[-1], x, self.weights[-1])


class ResidualTransform(nn.Module):
    """A linear map plus a per-token MLP correction: ``x @ W + b + mlp(x)``, ``(..., in) -> (..., out)``.

    The MLP's last layer starts at zero, so a fresh transform is exactly its linear part, which
    :meth:`init_linear` can set (e.g. to a PCA basis) to start training from a sensible codec.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int, layers: int = 2) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = TokenMLP(in_dim, out_dim, hidden, layers)
        last = self.mlp.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    @torch.no_grad()
    def init_linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """``weight`` ``(in, out)``."""
        self.linear.weight.copy_(weight.t())
        self.linear.bias.copy_(bias if bias is not None else torch.zeros_like(self.linear.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.mlp(x)

    @torch.no_grad()
    def fused(
        self,
        in_shift: torch.Tensor | None = None,
        in_scale: torch.Tensor | None = None,
        out_shift: torch.Tensor | None = None,
        out_scale: torch.Tensor | None = None,
    ) -> FusedResidual:
        """This transform frozen for coding, with per-channel affine maps folded into its ends:
        ``out_scale * self((x - in_shift) / in_scale) + out_shift`` (omitted maps are the identity)."""
        linear, layers = self.linear, list(self.mlp.net)
        first_out = linear.out_features
        weight = torch.cat([linear.weight, layers[0].weight])  # (out + hidden, in)
        bias = torch.cat([linear.bias, layers[0].bias])
        if len(layers) == 1:  # no hidden layer: two linear maps, summed
            weight = weight[:first_out] + weight[first_out:]
            bias = bias[:first_out] + bias[first_out:]
            last_weight, last_bias = weight.new_zeros(0, first_out), bias.new_zeros(first_out)
        else:
            last_weight, last_bias = layers[-1].weight.t(), layers[-1].bias
        if in_scale is not None:
            weight = weight / in_scale
        if in_shift is not None:
            bias = bias - weight @ in_shift
        bias = bias.clone()
        bias[:first_out] += last_bias  # the MLP's last bias joins the linear map's
        if out_scale is not None:
            weight[:first_out] *= out_scale[:, None]
            bias[:first_out] *= out_scale
            last_weight = last_weight * out_scale
        if out_shift is not None:
            bias[:first_out] += out_shift
        inner = [m for m in layers[1:-1] if isinstance(m, nn.Linear)]
        return FusedResidual(
            weight.t().contiguous(),
            bias,
            first_out,
            ACTIVATIONS[self.mlp.activation][1],
            tuple((linear.weight.t().contiguous(), linear.bias.clone()) for linear in inner),
            last_weight.contiguous(),
        )


@dataclass(frozen=True)
class FusedResidual:
    """A :class:`ResidualTransform` as coding runs it: ``x @ W + b + mlp(x)`` with the linear map and
    the MLP's first layer side by side in one matrix, so one product serves both, and maps that can act
    once per sequence doing so. Coding sends a few dozen tokens at a time, where the fixed cost of each
    small product outweighs its arithmetic; results differ from the module's only by float rounding.
    """

    first_weight: torch.Tensor  # (in, out + hidden): the linear map, then the MLP's first layer
    first_bias: torch.Tensor  # (out + hidden,), the MLP's last bias folded into the linear map's
    out_dim: int
    activation: Callable[[torch.Tensor], torch.Tensor]
    inner: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # the MLP's layers between its first and last
    last_weight: torch.Tensor  # (hidden, out); empty without a hidden layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(T, in)`` -> ``(T, out)``."""
        return self.finish(torch.addmm(self.first_bias, x, self.first_weight))

    def with_shared(self, x: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """``self(cat([x, shared expanded over tokens], -1))``, ``x`` ``(T, a)``, ``shared`` ``(s,)``:
        ``shared``'s part of the first product is one vector-matrix product."""
        width = x.shape[-1]
        bias = torch.addmm(self.first_bias, shared[None], self.first_weight[width:])
        return self.finish(torch.addmm(bias, x, self.first_weight[:width]))

    def with_shared_per_sequence(self, x: torch.Tensor, shared: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """:meth:`with_shared` for several sequences' tokens stacked: ``x`` ``(sum T, a)``, one ``shared`` row
        per sequence ``(N, s)``, and each sequence's token count ``(N,)``."""
        width = x.shape[-1]
        bias = torch.addmm(self.first_bias, shared, self.first_weight[width:]).repeat_interleave(counts, dim=0)
        return self.finish(bias.addmm_(x, self.first_weight[:width]))

    def token_mean(self, x: torch.Tensor, first_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """``self(x).mean(0)``, ``(T, in)`` -> ``(out,)``: the maps outside the nonlinearity act on means.
        ``first_hidden``: the MLP's first product of ``x``, when the caller computed it with another."""
        out = self.out_dim
        # Means as products with a row of 1/T and row-vector products rather than torch's reduction and
        # matrix-vector kernels: after the model's front blocks have run, every kernel the codec is the
        # first to call starts from cold caches, and the front runs matrix products already.
        mean_row = _mean_row(x.shape[0], x.dtype)
        linear = torch.addmm(self.first_bias[:out], mean_row @ x, self.first_weight[:, :out])
        if not len(self.last_weight):
            return linear[0]
        if first_hidden is None:
            first_hidden = torch.addmm(self.first_bias[out:], x, self.first_weight[:, out:])
        return linear.addmm_(mean_row @ self._hidden(first_hidden), self.last_weight)[0]

    def _hidden(self, first_hidden: torch.Tensor) -> torch.Tensor:
        """The MLP from its first product's output to its last product's input."""
        hidden = self.activation(first_hidden)
        for weight, bias in self.inner:
            hidden = self.activation(torch.addmm(bias, hidden, weight))
        return hidden

    def output_bound(self, input_bound: float) -> float:
        """A bound on the magnitude of every output (and every partial sum on the way) for inputs of
        magnitude at most ``input_bound``; the activations (ReLU, GELU) never make a value larger."""
        first = input_bound * self.first_weight.double().abs().sum(0) + self.first_bias.double().abs()
        hidden = float(first[self.out_dim :].max()) if len(self.last_weight) else 0.0
        for weight, bias in self.inner:
            hidden = hidden * float(weight.double().abs().sum(0).max()) + float(bias.double().abs().max())
        if not len(self.last_weight):
            return float(first.max())
        return float((first[: self.out_dim] + hidden * self.last_weight.double().abs().sum(0)).max())

    def finish(self, first: torch.Tensor) -> torch.Tensor:
        """The rest of the transform from its first product ``x @ first_weight + first_bias``."""
        if not len(self.last_weight):
            return first
        return torch.addmm(first[:, : self.out_dim], self._hidden(first[:, self.out_dim :]), self.last_weight)


@functools.lru_cache(maxsize=256)
def _mean_row(tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """``(1, tokens)`` of ``1 / tokens``: a sequence's mean as a product. Kept, since filling it anew is one
    more kernel to come to from cold caches; never written to."""
    return torch.full((1, tokens), 1.0 / tokens, dtype=dtype)


def principal_directions(samples: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``count`` principal directions ``(D, count)`` of centred ``samples`` ``(N, D)`` and their std."""
    centred = samples.double() - samples.double().mean(0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    std = singular[:count] / max(1, samples.shape[0] - 1) ** 0.5
    return vh[:count].t().float(), std.float()


class TokenGate(nn.Module):
    """Per-token keep/drop decision made on the edge, so dropped tokens cost no bits (after Tan 2023,
    Infor-Coef). Training samples hard 0/1 decisions from a binary-concrete relaxation and passes
    gradients straight through its soft value; serving keeps the tokens whose logit exceeds a
    threshold (the bitrate knob).

    The first token ([CLS] for BERT) is always kept: attention and mean pooling are normalised, so
    something must remain for the back half to work on.
    """

    def __init__(self, width: int, hidden: int = 64, temperature: float = 2.0 / 3.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.temperature = temperature
        nn.init.constant_(self.net[-1].bias, 3.0)  # start by keeping everything

    def logits(self, standardized: torch.Tensor) -> torch.Tensor:
        """``(..., T, D)`` standardised hidden states -> keep logits ``(..., T)``."""
        return self.net(standardized).squeeze(-1)

    def sample(self, standardized: torch.Tensor) -> torch.Tensor:
        """Training weights ``(..., T)``: 0/1 forward, binary-concrete gradient backward, 1 for the first token."""
        u = torch.rand_like(standardized[..., 0]).clamp(1e-6, 1 - 1e-6)
        noise = torch.log(u) - torch.log1p(-u)
        soft = torch.sigmoid((self.logits(standardized) + noise) / self.temperature)
        hard = (soft > 0.5).to(soft.dtype)
        hard[..., 0] = 1.0
        return hard + soft - soft.detach()

    def keep(self, standardized: torch.Tensor, threshold: float = 0.0) -> np.ndarray:
        """``(T, D)`` -> ``(T,)`` bool: the first token, and those whose logit exceeds ``threshold``."""
        kept = (self.logits(standardized) > threshold).numpy()
        kept[0] = True
        return kept


class Standardizer(nn.Module):
    """Per-channel affine normalisation with statistics fitted on training data (buffers, not learned)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))

    @torch.no_grad()
    def fit(self, samples: torch.Tensor) -> None:
        """``samples`` ``(N, width)``: hidden states of real tokens."""
        self.mean.copy_(samples.mean(0))
        self.std.copy_(samples.std(0).clamp_min(1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean


class CodingModel(nn.Module):
    """Base of the trainable codec modules: likelihoods for training and coding side by side.

    ``forward`` returns ``(hidden_hat, bits)`` for training; ``update_tables()`` builds the integer
    tables (registered buffers, saved with the state dict); ``compress()`` and ``decompress()`` code
    one sequence with them.
    """

    config: dict[str, object]

    def __init__(self) -> None:
        super().__init__()
        self.gate: TokenGate | None = None  # codecs that drop tokens set one

    def forward(
        self, hidden: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T, D)`` (real tokens where ``token_mask`` is True) -> reconstruction ``(B, T, D)`` and
        estimated bits per token ``(B, T)``."""
        raise NotImplementedError

    def update_tables(self) -> None:
        """Rebuild the integer coding tables from the current parameters."""
        raise NotImplementedError

    def compress(self, hidden: torch.Tensor) -> bytes:
        """``(T, D)`` -> body bytes."""
        raise NotImplementedError

    def decompress(self, body: bytes | memoryview, tokens: int) -> torch.Tensor:
        """Body bytes -> ``(tokens, D)``; raises BitstreamError on malformed input."""
        raise NotImplementedError

    def new_carry(self) -> object | None:
        """What coding carries from one payload of a stream to the next (see Codec.new_carry); None here:
        modules that give one also implement the two methods below."""
        return None

    def compress_carried(self, hidden: torch.Tensor, carry: object) -> bytes:
        """:meth:`compress`, for the next payload of the stream ``carry`` belongs to (updating it)."""
        raise NotImplementedError

    def decompress_carried(self, body: bytes | memoryview, tokens: int, carry: object) -> torch.Tensor:
        """:meth:`decompress`, for the next payload of the stream ``carry`` belongs to (updated only when
        the body decodes)."""
        raise NotImplementedError

    def decompress_many(self, items: Sequence[tuple[bytes | memoryview, int]]) -> list[torch.Tensor | BitstreamError]:
        """:meth:`decompress` for several ``(body, tokens)``, each result in its place, a malformed body's
        BitstreamError included. One at a time here; modules that can batch their transforms override it."""
        return each_or_error(self.decompress, items)

    def estimate_bits(self, hidden: torch.Tensor) -> float:
        """Ideal code length of ``(T, D)`` under the integer tables (what compress() should approach)."""
        raise NotImplementedError

    def decodes_only_finite(self) -> bool:
        """True when every body that decodes is proven to give finite values, so the decoder's output
        need not be checked; False (the default) leaves the check to the codec."""
        return False

    def fit(self, samples: torch.Tensor, latent_scale: float = 1.0, shared_step: bool = False) -> None:
        """Set data-dependent statistics from ``samples`` ``(N, D)`` (real tokens' hidden states) before training;
        ``latent_scale`` > 1 starts the latents finer than one standard deviation per quantisation step;
        ``shared_step``: one step for every latent rather than one per latent's spread (codecs that offer it)."""
        raise NotImplementedError

    def keep_mask(self, hidden: torch.Tensor) -> np.ndarray | None:
        """Which tokens of ``(T, D)`` to send; None when the codec sends every token."""
        if self.gate is None:
            return None
        with torch.inference_mode():
            return self.gate.keep(self.standardize(hidden.float()))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        # Table buffers change shape with training; size them to the checkpoint's before loading.
        for name, tensor in state_dict.items():
            try:
                buffer = self.get_buffer(name)
            except AttributeError:
                continue
            if buffer.shape != tensor.shape:
                buffer.resize_(tensor.shape)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _inference() -> contextlib.AbstractContextManager[object]:
    """Inference mode, entered only when the caller is not in it already: on the coding path, which runs
    right after the model's own blocks, entering it again costs as much as a small matrix product."""
    return contextlib.nullcontext() if torch.is_inference_mode_enabled() else torch.inference_mode()


class LearnedCodec(Codec):
    """A codec around a trained :class:`CodingModel`; coding happens in the module's integer tables."""

    module_class: type[CodingModel]

    def __init__(self, name: str, width: int, module: CodingModel, splits: tuple[int, ...] = ()) -> None:
        super().__init__(name, width, splits)
        self.module = module.eval().requires_grad_(False)

    def encode(self, hidden: torch.Tensor) -> bytes:
        with _inference():
            return self.module.compress(hidden)

    def decode(self, body: bytes | memoryview, tokens: int) -> torch.Tensor:
        with _inference():
            return self.module.decompress(body, tokens)

    def new_carry(self) -> object | None:
        return self.module.new_carry()

    def encode_carried(self, hidden: torch.Tensor, carry: object) -> bytes:
        with _inference():
            return self.module.compress_carried(hidden, carry)

    def decode_carried(self, body: bytes | memoryview, tokens: int, carry: object) -> torch.Tensor:
        with _inference():
            return self.module.decompress_carried(body, tokens, carry)

    def decodes_only_finite(self) -> bool:
        return self.module.decodes_only_finite()

    def decode_bodies(
        self, parsed: Sequence[tuple[container.Header, bytes | memoryview]]
    ) -> list[torch.Tensor | BitstreamError]:
        if len(parsed) < 2:
            return super().decode_bodies(parsed)
        with _inference():
            decoded = self.module.decompress_many([(body, header.kept_tokens) for header, body in parsed])
        results: list[torch.Tensor | BitstreamError] = []
        for hidden in decoded:
            try:
                results.append(hidden if isinstance(hidden, BitstreamError) else self.checked_output(hidden))
            except BitstreamError as exc:
                results.append(exc)
        return results

    def estimate_bits(self, hidden: torch.Tensor) -> float:
        with _inference():
            return self.module.estimate_bits(hidden)

    def select_tokens(self, hidden: torch.Tensor) -> np.ndarray | None:
        return self.module.keep_mask(hidden)

    def config(self) -> dict[str, object]:
        return {**super().config(), **self.module.config}

    def parameters_for_fingerprint(self) -> list[tuple[str, torch.Tensor]]:
        adapter = sorted((FRONT_ADAPTER_PREFIX + k, t) for k, t in (self.front_adapter or {}).items())
        return list(self.module.state_dict().items()) + adapter

    def save(self, path: Path) -> None:
        save_checkpoint(self.module, self.kind, path, self.front_adapter)


FRONT_ADAPTER_PREFIX = "front_adapter."  # checkpoint keys of a front adapter, beside the module's own


def save_checkpoint(
    module: CodingModel, kind: CodecKind, path: Path, front_adapter: dict[str, torch.Tensor] | None = None
) -> None:
    """Write ``module`` (its config, weights and integer tables) and the front adapter it was trained
    with, if any, to a safetensors file."""
    module.update_tables()
    tensors = {name: t.detach().contiguous() for name, t in module.state_dict().items()}
    for name, t in (front_adapter or {}).items():
        tensors[FRONT_ADAPTER_PREFIX + name] = t.detach().contiguous()
    metadata = {"kind": kind.label, "config": json.dumps(module.config, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def read_checkpoint(path: Path) -> tuple[str, dict[str, object], dict[str, torch.Tensor]]:
    """(kind label, config, tensors) of a checkpoint file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return metadata["kind"], json.loads(metadata["config"]), load_file(str(path))


def split_front_adapter(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """A checkpoint's tensors -> (the module's, the front adapter's or None)."""
    adapter = {
        k.removeprefix(FRONT_ADAPTER_PREFIX): t for k, t in tensors.items() if k.startswith(FRONT_ADAPTER_PREFIX)
    }
    module = {k: t for k, t in tensors.items() if not k.startswith(FRONT_ADAPTER_PREFIX)}
    return module, adapter or None


def load_learned_codec(entry: CheckpointEntry, width: int) -> Codec:
    """Instantiate the codec a manifest entry points to."""
    from splitwire.codec.factorized import FactorizedCodec
    from splitwire.codec.fitted import PcaCodec, UniformCodec
    from splitwire.codec.hyperprior import HyperpriorCodec

    classes: dict[CodecKind, type[LearnedCodec]] = {
        CodecKind.FACTORIZED: FactorizedCodec,
        CodecKind.HYPERPRIOR: HyperpriorCodec,
        CodecKind.UNIFORM: UniformCodec,
        CodecKind.PCA: PcaCodec,
    }
    kind_label, config, tensors = read_checkpoint(entry.file)
    codec_class = classes[entry.kind]
    if kind_label != entry.kind.label:
        raise ValueError(f"{entry.file}: checkpoint holds a {kind_label} codec, the manifest says {entry.kind.label}")
    if int(config["width"]) != width:
        raise ValueError(f"{entry.file}: codec width {config['width']} does not match model width {width}")
    tensors, front_adapter = split_front_adapter(tensors)
    module = codec_class.module_class(**config)
    module.load_state_dict(tensors)
    codec = codec_class(entry.name, width, module, splits=(entry.split,))
    codec.front_adapter = front_adapter
    codec.expected_bits_per_token = entry.expected_bits_per_token
    return codec
