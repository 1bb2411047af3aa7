#!/usr/bin/env bash
# The demo: installs splitwire into .venv, starts a cloud server on loopback, and scores real STS-B
# sentence pairs through the split with several codecs, next to the unsplit model, with their bitrates.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh bench

port="${SPLITWIRE_DEMO_PORT:-50151}"
metrics_port="${SPLITWIRE_DEMO_METRICS_PORT:-9564}"
log=".demo-server.log"
.venv/bin/splitwire-cloud serve --port "$port" --metrics-port "$metrics_port" >"$log" 2>&1 &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT

for _ in $(seq 1 120); do
  grep -q "serving on" "$log" && break
  kill -0 "$server" 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.5
done
grep -q "serving on" "$log" || { echo "server did not come up; see $log" >&2; exit 1; }

echo "== one sentence through the split (splitwire-edge run --json), embedding shortened"
.venv/bin/splitwire-edge run --server "127.0.0.1:$port" --json "A man is playing a guitar on stage." |
  .venv/bin/python -c 'import json,sys; r=json.load(sys.stdin); r["embedding"]=r["embedding"][:4]+["..."]; print(json.dumps(r, indent=1))'

echo
echo "== STS-B dev pairs through the split, per codec (splitwire-bench demo)"
.venv/bin/splitwire-bench demo --server "127.0.0.1:$port" "$@"

echo
echo "== the server's own account (Prometheus /metrics on port $metrics_port), bits per token by codec"
.venv/bin/python - "$metrics_port" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
for line in text.splitlines():
    if line.startswith(("splitwire_cloud_bits_per_token_sum", "splitwire_cloud_bits_per_token_count")):
        print(line)
PY
