"""The committed stubs are exactly what the pinned generator makes from the .proto file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import REPO


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.fail("grpcio-tools is missing: install the test extra (pip install -e '.[test]')")
    spec = importlib.util.spec_from_file_location("generate", REPO / "proto" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(generate)
    for fresh in generate.generate(tmp_path):
        committed = REPO / "proto" / fresh.relative_to(tmp_path)
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{committed} is stale: run `python proto/generate.py` and commit the result"
        )
