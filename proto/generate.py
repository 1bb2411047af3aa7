"""Generate the Python stubs for the wire contract.

Run from anywhere: ``python proto/generate.py [OUT_DIR]``. Without OUT_DIR the stubs are written next to the
``.proto`` file, which is where the installed package imports them from. The generator is pinned (see the
``test`` extra in pyproject.toml) so that the output is reproducible byte for byte.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ["splitwire/v1/splitwire.proto"]


def generate(out_root: Path) -> list[Path]:
    """Write ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` under ``out_root`` and return their paths."""
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    outputs = []
    for proto in PROTO_FILES:
        stem = proto.removesuffix(".proto")
        outputs += [
            out_root / f"{stem}_pb2.py",
            out_root / f"{stem}_pb2.pyi",
            out_root / f"{stem}_pb2_grpc.py",
        ]
    return outputs


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT
    for path in generate(target):
        print(path)
