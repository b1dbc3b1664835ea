#!/usr/bin/env bash
# Load test of `inspector serve` on loopback with wrk: 64 concurrent clients for 30 s on the
# fixture model (the tiny checkpoint with the overfitted adapter of the training tests), once
# with micro-batching (--max-batch 8) and once without (--max-batch 1). Prints throughput,
# p50/p99 latency, the answers' statuses and the server's peak RSS for each, and the ratio.
#
#   tools/loadtest/run.sh            # DURATION=30s CONNECTIONS=64 by default
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-30s}
CONNECTIONS=${CONNECTIONS:-64}
if ! command -v wrk >/dev/null; then
    apt-get install -y -q wrk >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q wrk >/dev/null; }
fi
cargo build --release --locked -p inspector-cli >/dev/null
BIN=target/release/inspector
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"; kill $(jobs -p) 2>/dev/null || true' EXIT
python3 - "$WORK/body.json" <<'PY'
import base64, json, sys
photo = open("crates/train/tests/fixtures/overfit/data/3.png", "rb").read()
json.dump({"image_base64": base64.b64encode(photo).decode()}, open(sys.argv[1], "w"))
PY
declare -A RPS
for BATCH in 1 8; do
    PORT=$((18000 + BATCH))
    "$BIN" serve --model crates/qwen2vl/tests/fixtures/tiny-a \
        --adapter crates/train/tests/fixtures/overfit/adapter \
        --addr 127.0.0.1:$PORT --db "$WORK/b$BATCH.db" --data-dir "$WORK/data$BATCH" \
        --no-cache --rate-limit 0 --max-new-tokens 160 --queue 64 --max-batch $BATCH \
        2>"$WORK/server$BATCH.log" &
    PID=$!
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break
        sleep 0.1
    done
    OUT=$(BODY_FILE="$WORK/body.json" wrk -t4 -c"$CONNECTIONS" -d"$DURATION" --timeout 60s --latency \
        -s tools/loadtest/post.lua "http://127.0.0.1:$PORT/api/v1/inspections")
    RSS=$(awk '/VmHWM/ {print $2}' /proc/$PID/status)
    BATCHES=$(curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^inspector_batch_size_(sum|count)/ {v[$1]=$2} END {if (v["inspector_batch_size_count"]>0) printf "%.2f", v["inspector_batch_size_sum"]/v["inspector_batch_size_count"]}')
    kill -TERM $PID
    wait $PID || true
    RPS[$BATCH]=$(echo "$OUT" | awk '/Requests\/sec/ {print $2}')
    echo "== --max-batch $BATCH: $CONNECTIONS clients, $DURATION"
    echo "$OUT" | grep -E 'Requests/sec|statuses|errors:|p50_ms|requests in'
    echo "mean batch: $BATCHES photos; peak RSS: $((RSS / 1024)) MiB"
done
python3 -c "print(f'micro-batching throughput ratio (batch 8 / batch 1): {float(\"${RPS[8]}\") / float(\"${RPS[1]}\"):.2f}')"
