"""Coverage-guided fuzzing of the container parser and every decoder with atheris (optional).

The default test run fuzzes with hypothesis (tests/test_fuzz.py); this harness lets libFuzzer mutate
payloads guided by coverage of splitwire's own code, for as long as you like::

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/fuzz_payloads.py -atheris_runs=1000000 -max_len=4096 [CORPUS_DIR]

Each input picks a codec (raw ones, a small seeded codec of every learned kind, every shipped
checkpoint) and a payload; the harness fails on anything but a clean BitstreamError or finite values of
the declared shape. libFuzzer writes a crashing input to ``crash-*``; replay it by passing that file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the codec builders

with atheris.instrument_imports(include=["splitwire"]):
    import torch
    from splitwire.codec.errors import BitstreamError
    from test_fuzz import CODECS, MAX_TOKENS

torch.set_num_threads(1)
NAMES = sorted(CODECS)


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    codec = CODECS[NAMES[provider.ConsumeIntInRange(0, len(NAMES) - 1)]]
    payload = provider.ConsumeBytes(provider.remaining_bytes())
    try:
        header, hidden = codec.decode_payload(payload, max_tokens=MAX_TOKENS)
    except BitstreamError as exc:
        if not str(exc):
            raise AssertionError("a refusal must say why") from exc
        return
    if not 1 <= header.tokens <= MAX_TOKENS or hidden.shape != (header.kept_tokens, codec.width):
        raise AssertionError(f"{codec.name}: decoded {tuple(hidden.shape)} for header {header}")
    if not torch.isfinite(hidden).all():
        raise AssertionError(f"{codec.name}: non-finite values passed the decoder")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
