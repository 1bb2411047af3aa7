#!/usr/bin/env bash
# Installs splitwire with its test dependencies into .venv and runs the default (fast) test suite.
# The deployment tests use Debian's prometheus package (promtool, and a real Prometheus) and its
# docker-compose (to validate the compose file): installed here when missing and this runs as root with
# apt-get (set SPLITWIRE_NO_APT=1 to leave the system alone); without them those tests are skipped, saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ] && [ -z "${SPLITWIRE_NO_APT:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
    >/dev/null 2>&1 || echo "scripts/test.sh: could not install ${missing[*]}; their tests will be skipped" >&2
fi
exec .venv/bin/python -m pytest "$@"
