"""Content hashes that let two processes prove they hold the same model or codec.

A fingerprint is the first 16 hex digits of a SHA-256 over a canonical description: configuration
keys that change the computation, then every tensor's name, dtype, shape and raw bytes in name order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

import torch

FINGERPRINT_HEX_DIGITS = 16

# Bookkeeping keys that differ between otherwise identical models.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "name_or_path", "dtype", "torch_dtype", "architectures"}


def tensors_fingerprint(config: Mapping[str, object], tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Hash a JSON-able ``config`` and named tensors, independent of tensor iteration order."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        # Hash the raw bytes whatever the dtype (numpy has no bfloat16).
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:FINGERPRINT_HEX_DIGITS]


def model_fingerprint(model: torch.nn.Module) -> str:
    """Fingerprint of a Hugging Face model: its config (minus bookkeeping) and its state dict."""
    config = {
        key: value
        for key, value in model.config.to_dict().items()
        if not key.startswith("_") and key not in _VOLATILE_CONFIG_KEYS
    }
    return tensors_fingerprint(config, model.state_dict().items())
