"""Codecs by name: the built-in ones, and the trained checkpoints shipped for a model.

Both sides build the same catalog from the same package files, then compare fingerprints once per
connection. Checkpoints are listed in ``checkpoints/manifest.json``; each entry names the model
fingerprint and split it was trained for, so a catalog only offers what fits the loaded model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from splitwire.codec.base import Codec, CodecKind
from splitwire.codec.errors import UnknownCodecError
from splitwire.codec.raw import Bf16Codec, Fp16Codec, Fp32Codec, Int8ZstdCodec
from splitwire.codec.token_ids import TOKEN_IDS_CODEC, TokenIdsCodec

log = logging.getLogger(__name__)

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
MANIFEST_NAME = "manifest.json"

BUILTIN_CODECS: dict[str, Callable[[str, int], Codec]] = {
    "fp32": Fp32Codec,
    "fp16": Fp16Codec,
    "bf16": Bf16Codec,
    "int8-zstd": Int8ZstdCodec,
}
DEFAULT_CODEC = "fp16"


@dataclass(frozen=True)
class CheckpointEntry:
    """One trained codec as the manifest describes it."""

    name: str
    kind: CodecKind
    file: Path
    model: str
    model_fingerprint: str
    split: int
    config: dict[str, object] = field(default_factory=dict)
    expected_bits_per_token: float | None = None
    default: bool = False

    @classmethod
    def from_json(cls, entry: dict[str, object], folder: Path) -> CheckpointEntry:
        return cls(
            name=str(entry["name"]),
            kind=CodecKind[str(entry["kind"]).upper().replace("-", "_")],
            file=folder / str(entry["file"]),
            model=str(entry["model"]),
            model_fingerprint=str(entry["model_fingerprint"]),
            split=int(entry["split"]),
            config=dict(entry.get("config", {})),
            expected_bits_per_token=entry.get("expected_bits_per_token"),
            default=bool(entry.get("default", False)),
        )


def read_manifest(folder: Path = CHECKPOINT_DIR) -> list[CheckpointEntry]:
    """Entries of ``folder/manifest.json``; an absent manifest means no checkpoints."""
    path = folder / MANIFEST_NAME
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return [CheckpointEntry.from_json(entry, folder) for entry in data.get("checkpoints", [])]


def load_checkpoint(entry: CheckpointEntry, width: int) -> Codec:
    """Build the codec a manifest entry describes."""
    from splitwire.codec.learned import load_learned_codec

    return load_learned_codec(entry, width)


class CodecCatalog:
    """The codecs available for one model: built-ins at every split, checkpoints at their own."""

    def __init__(self, codecs: dict[str, Codec], default: str) -> None:
        if default not in codecs:
            raise UnknownCodecError(f"default codec {default!r} is not among {sorted(codecs)}")
        self._codecs = codecs
        self.default = default

    @classmethod
    def for_model(
        cls,
        model_fingerprint: str,
        width: int,
        checkpoint_dir: Path = CHECKPOINT_DIR,
        vocab_size: int | None = None,
    ) -> CodecCatalog:
        """Built-ins, ``token-ids`` when the model's ``vocab_size`` is given, and the checkpoints trained
        for ``model_fingerprint``."""
        codecs: dict[str, Codec] = {name: make(name, width) for name, make in BUILTIN_CODECS.items()}
        if vocab_size is not None:
            codecs[TOKEN_IDS_CODEC] = TokenIdsCodec(vocab_size)
        default = DEFAULT_CODEC
        for entry in read_manifest(checkpoint_dir):
            if entry.model_fingerprint != model_fingerprint:
                continue
            codecs[entry.name] = load_checkpoint(entry, width)
            if entry.default:
                default = entry.name
        return cls(codecs, default)

    def names(self, split: int | None = None) -> list[str]:
        """Codec names, those valid at ``split`` when given; built-ins first."""
        return [name for name, codec in self._codecs.items() if split is None or codec.valid_at(split)]

    def get(self, name: str | None) -> Codec:
        """The codec called ``name``; the default when ``name`` is empty."""
        key = name or self.default
        try:
            return self._codecs[key]
        except KeyError:
            raise UnknownCodecError(f"unknown codec {key!r}; available: {', '.join(self._codecs)}") from None

    def __iter__(self):
        return iter(self._codecs.values())
