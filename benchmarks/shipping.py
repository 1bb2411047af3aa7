"""Putting trained codecs into the package: checkpoint files plus their manifest entries.

The manifest (``codec/checkpoints/manifest.json``) is the one record of what ships: for each codec its
file, model fingerprint, split, training settings, and the dev figures ``splitwire-bench rd`` measured.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from splitwire.codec.catalog import CHECKPOINT_DIR, MANIFEST_NAME


def load_manifest(folder: Path = CHECKPOINT_DIR) -> dict[str, list[dict[str, object]]]:
    """The manifest as stored, every field of every entry (``codec.catalog.read_manifest`` keeps the ones
    serving needs)."""
    path = folder / MANIFEST_NAME
    return json.loads(path.read_text()) if path.exists() else {"checkpoints": []}


def _save(data: dict[str, list[dict[str, object]]], folder: Path) -> None:
    data["checkpoints"].sort(key=lambda e: (str(e["model"]), int(e["split"]), str(e["kind"]), str(e["name"])))
    (folder / MANIFEST_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def install_checkpoint(source: Path, entry: dict[str, object], folder: Path = CHECKPOINT_DIR) -> Path:
    """Copy ``source`` into ``folder`` as ``<name>.safetensors`` and add or replace its manifest entry."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{entry['name']}.safetensors"
    shutil.copyfile(source, target)
    data = load_manifest(folder)
    data["checkpoints"] = [e for e in data["checkpoints"] if e["name"] != entry["name"]]
    data["checkpoints"].append({**entry, "file": target.name})
    _save(data, folder)
    return target


def record_figures(
    name: str,
    figures: dict[str, object],
    folder: Path = CHECKPOINT_DIR,
    expected_bits_per_token: float | None = None,
) -> None:
    """Store measured dev figures under the entry ``name``, and the rate servers announce for it
    (``GetServerInfo``) when given: measured on the model's reference task (STS-B, WikiText-2)."""
    data = load_manifest(folder)
    for entry in data["checkpoints"]:
        if entry["name"] == name:
            entry.setdefault("dev", {}).update(figures)
            if expected_bits_per_token is not None:
                entry["expected_bits_per_token"] = round(float(expected_bits_per_token), 2)
            break
    else:
        raise KeyError(f"no manifest entry named {name!r}")
    _save(data, folder)


def set_default(name: str, folder: Path = CHECKPOINT_DIR) -> None:
    """Make ``name`` the default codec of its model (the others of that model lose the flag)."""
    data = load_manifest(folder)
    chosen = next((e for e in data["checkpoints"] if e["name"] == name), None)
    if chosen is None:
        raise KeyError(f"no manifest entry named {name!r}")
    for entry in data["checkpoints"]:
        if entry["model_fingerprint"] == chosen["model_fingerprint"]:
            entry["default"] = entry["name"] == name
    _save(data, folder)
