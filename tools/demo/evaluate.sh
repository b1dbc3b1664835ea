#!/usr/bin/env bash
# Evaluates the bundled demo model (or the one in $DEMO) on 500 synthetic scenes of a seed never
# used in training (999), with and without the LoRA stage, through `inspector eval`.
# Writes models/demo/eval/{base,adapter}.json (every metric) and prints the headline numbers.
#
# Usage: tools/demo/evaluate.sh [WORK_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${1:-/tmp/inspector-demo-eval}"
DEMO="${DEMO:-$ROOT/models/demo}"
N="${N:-500}"
BIN="${INSPECTOR_BIN:-$ROOT/target/release/inspector}"
if [ ! -x "$BIN" ]; then
  (cd "$ROOT" && cargo build --release --locked -p inspector-cli)
fi
rm -rf "$WORK" && mkdir -p "$WORK" "$DEMO/eval"
"$BIN" synth --n "$N" --seed 999 --size 320 --out "$WORK/scenes"
DB="$WORK/rules.sqlite"
# With no --model, eval uses the bundled demo (base + adapter).
echo "== base + adapter (the default)"
INSPECTOR_DEMO_MODEL="$DEMO" "$BIN" eval --data "$WORK/scenes/annotations.jsonl" --db "$DB" \
  --out "$WORK/adapter" | tee "$DEMO/eval/adapter.txt"
echo "== base alone"
"$BIN" eval --model "$DEMO/base" --data "$WORK/scenes/annotations.jsonl" --db "$DB" \
  --out "$WORK/base" | tee "$DEMO/eval/base.txt"
cp "$WORK/adapter/report.json" "$DEMO/eval/adapter.json"
cp "$WORK/base/report.json" "$DEMO/eval/base.json"
