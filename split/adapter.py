"""Front adapters: low-rank corrections to the edge's front blocks that a codec is trained with.

The back half can only use what the codec keeps, so the cheapest place to shape what is kept is
before the split: a rank-``r`` update ``W + B A`` of every linear layer in blocks ``[0, k)`` lets the
front emit hidden states that cost fewer bits for the same next-token distributions. The model's own
weights stay untouched: training wraps copies of the front blocks in :class:`LowRankLinear`, serving
merges the update into copies (:func:`merged_front`), and the cloud's back half is the unchanged
model. An adapter is a flat mapping ``"{block}.{linear}.a"`` ``(r, in)`` / ``"{block}.{linear}.b"``
``(out, r)``, stored beside the codec's own tensors in its checkpoint.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import nn

# The linear layers of a Llama-style block (SmolLM2, the tiny Llama) that an adapter corrects.
ADAPTED_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


class LowRankLinear(nn.Module):
    """``base(x) + x A^T B^T`` with ``base`` frozen; ``B`` starts at zero, so the block starts unchanged."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.t()) @ self.b.t()


def adapter_blocks(adapter: Mapping[str, torch.Tensor]) -> int:
    """How many front blocks ``adapter`` corrects (its highest block index + 1)."""
    return 1 + max(int(key.split(".", 1)[0]) for key in adapter)


def _linear(block: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(the module holding linear ``name`` of ``block``, its attribute name)."""
    parent_path, attribute = name.rsplit(".", 1)
    return block.get_submodule(parent_path), attribute


def trainable_front(layers: nn.ModuleList, blocks: int, rank: int) -> tuple[nn.ModuleList, dict[str, nn.Parameter]]:
    """``layers`` with its first ``blocks`` replaced by copies whose adapted linears are wrapped in a
    :class:`LowRankLinear` (the copied weights frozen), and the adapter's parameters by key."""
    if blocks > len(layers):
        raise ValueError(f"a front adapter on {blocks} blocks; the model has {len(layers)}")
    adapted = nn.ModuleList()
    parameters: dict[str, nn.Parameter] = {}
    for index, layer in enumerate(layers):
        if index >= blocks:
            adapted.append(layer)
            continue
        block = copy.deepcopy(layer).requires_grad_(False)
        for name in ADAPTED_LINEARS:
            parent, attribute = _linear(block, name)
            wrapped = LowRankLinear(getattr(parent, attribute), rank)
            setattr(parent, attribute, wrapped)
            parameters[f"{index}.{name}.a"] = wrapped.a
            parameters[f"{index}.{name}.b"] = wrapped.b
        adapted.append(block)
    return adapted, parameters


def merged_front(layers: nn.ModuleList, adapter: Mapping[str, torch.Tensor]) -> nn.ModuleList:
    """``layers`` with the adapter's updates added to deep copies of the blocks it corrects (the others
    shared): plain blocks that run as fast as the model's own."""
    blocks = adapter_blocks(adapter)
    if blocks > len(layers):
        raise ValueError(f"the front adapter corrects {blocks} blocks; the model has {len(layers)}")
    expected = {f"{index}.{name}.{part}" for index in range(blocks) for name in ADAPTED_LINEARS for part in "ab"}
    if set(adapter) != expected:
        unexpected = sorted(set(adapter) ^ expected)[:3]
        raise ValueError(
            f"a front adapter holds a pair of tensors per linear layer of blocks [0, {blocks}); {unexpected}"
        )
    merged = nn.ModuleList()
    with torch.no_grad():
        for index, layer in enumerate(layers):
            if index >= blocks:
                merged.append(layer)
                continue
            block = copy.deepcopy(layer)
            for name in ADAPTED_LINEARS:
                a, b = adapter[f"{index}.{name}.a"], adapter[f"{index}.{name}.b"]
                parent, attribute = _linear(block, name)
                linear = getattr(parent, attribute)
                if a.dim() != 2 or b.shape != (linear.out_features, a.shape[0]) or a.shape[1] != linear.in_features:
                    raise ValueError(f"front adapter {index}.{name}: shape does not match the model's layer")
                linear.weight += (b.double() @ a.double()).to(linear.weight.dtype)
            merged.append(block)
    return merged
