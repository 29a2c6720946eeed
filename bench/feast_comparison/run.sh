#!/usr/bin/env bash
# Feast's Redis online store vs treeops' OnlineHistory, against one real redis-server, each measured twice.
# Usage (from the repo root): bench/feast_comparison/run.sh [OUT_DIR]
# Needs the separate Feast venv: python3 -m venv /tmp/feastvenv && /tmp/feastvenv/bin/pip install 'feast[redis]==0.67.0'
set -euo pipefail
OUT=${1:-/tmp/feast_comparison}
FEAST_PY=${FEAST_PY:-/tmp/feastvenv/bin/python}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
mkdir -p "$OUT/redis"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$PORT" --dir "$OUT/redis" --save '' --appendonly no --daemonize no >"$OUT/redis.log" 2>&1 &
REDIS_PID=$!
trap 'kill "$REDIS_PID"' EXIT
until redis-cli -p "$PORT" ping >/dev/null 2>&1; do sleep 0.1; done
for run in 1 2; do
  uptime | tee "$OUT/uptime_feast_$run.txt"
  "$FEAST_PY" "$HERE/feast_latency.py" --port "$PORT" --repo /tmp/feastrepo >"$OUT/feast_$run.json"
  uptime | tee "$OUT/uptime_ours_$run.txt"
  (cd "$ROOT" && PYTHONPATH="$ROOT" .venv/bin/python "$HERE/ours_latency.py" --port "$PORT" >"$OUT/ours_$run.json")
done
uptime | tee "$OUT/uptime_end.txt"
