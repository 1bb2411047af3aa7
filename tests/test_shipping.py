"""Shipping codecs: the manifest records what ships, its figures and the default the catalog serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from splitwire.benchmarks.shipping import install_checkpoint, record_figures, set_default
from splitwire.codec.base import CodecKind
from splitwire.codec.catalog import MANIFEST_NAME, CodecCatalog
from splitwire.codec.fitted import UniformModel
from splitwire.codec.learned import save_checkpoint

WIDTH = 16


def ship(folder: Path, tmp_path: Path, name: str, fingerprint: str = "model-a") -> None:
    module = UniformModel(WIDTH, step=0.5)
    module.fit(torch.randn(200, WIDTH, generator=torch.Generator().manual_seed(1)))
    source = tmp_path / f"{name}-run.safetensors"
    save_checkpoint(module, CodecKind.UNIFORM, source)
    entry = {"name": name, "kind": "uniform", "model": "m", "model_fingerprint": fingerprint, "split": 2}
    install_checkpoint(source, entry, folder)


def test_installed_codecs_are_served_and_the_chosen_default_wins(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    ship(folder, tmp_path, "uniform-a")
    ship(folder, tmp_path, "uniform-b")
    ship(folder, tmp_path, "other-model", fingerprint="model-b")
    assert CodecCatalog.for_model("model-a", WIDTH, folder).default == "fp16"

    set_default("uniform-b", folder)
    catalog = CodecCatalog.for_model("model-a", WIDTH, folder)
    assert catalog.default == "uniform-b"
    assert {"uniform-a", "uniform-b"} <= set(catalog.names(split=2))
    assert "other-model" not in catalog.names()
    assert catalog.get(None).name == "uniform-b"

    set_default("uniform-a", folder)  # one default per model
    entries = json.loads((folder / MANIFEST_NAME).read_text())["checkpoints"]
    assert [e["name"] for e in entries if e.get("default")] == ["uniform-a"]


def test_figures_are_recorded_on_their_entry(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    ship(folder, tmp_path, "uniform-a")
    record_figures("uniform-a", {"stsb_sts-dev_quality": 86.1}, folder)
    (entry,) = json.loads((folder / MANIFEST_NAME).read_text())["checkpoints"]
    assert entry["dev"] == {"stsb_sts-dev_quality": 86.1} and "expected_bits_per_token" not in entry
    record_figures("uniform-a", {"stsb_sts-dev_bits_per_token": 41.234}, folder, expected_bits_per_token=41.234)
    (entry,) = json.loads((folder / MANIFEST_NAME).read_text())["checkpoints"]
    assert entry["dev"]["stsb_sts-dev_quality"] == 86.1 and entry["expected_bits_per_token"] == 41.23
    with pytest.raises(KeyError, match="no manifest entry"):
        set_default("missing", folder)
