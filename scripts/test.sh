#!/usr/bin/env bash
# Installs splitwire with its test dependencies into .venv and runs the default (fast) test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
