"""Rewrite the golden codec fixtures: one small checkpoint per codec kind, the payload it gives for a
seeded input, and what that payload decodes to.

Run only when the bitstream format changes on purpose (peers deployed with the old format will no longer
agree): ``.venv/bin/python tests/data/golden/regenerate.py [KIND ...]`` (default: every kind; name only a new
kind to leave the others' fixtures as they are; ``--payloads-only KIND ...`` keeps the committed checkpoints
and rewrites only what they code to, for a format change that leaves the models alone). Checkpoints are
committed because their
integer tables come from float arithmetic that may differ in the last bit between CPUs; the tables, once
stored, are what both peers use.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from splitwire.codec.learned import save_checkpoint  # noqa: E402
from test_learned_codecs import KINDS, build, golden_input, load_golden  # noqa: E402


def main() -> None:
    args = sys.argv[1:]
    payloads_only = "--payloads-only" in args
    args = [a for a in args if a != "--payloads-only"]
    for kind in args or KINDS:
        if payloads_only:
            codec = load_golden(kind)
        else:
            codec = build(kind)
            save_checkpoint(codec.module, codec.kind, HERE / f"{kind}.safetensors")
        payload = codec.encode_payload(golden_input())
        (HERE / f"{kind}.payload").write_bytes(payload)
        np.save(HERE / f"{kind}.decoded.npy", codec.decode_payload(payload)[1].numpy())
        print(f"{kind}: {len(payload)} bytes")


if __name__ == "__main__":
    main()
