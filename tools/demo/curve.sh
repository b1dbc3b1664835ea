#!/usr/bin/env bash
# The held-out learning curve of a training stage: scores each checkpoint of RUN (and its final
# model) on N scenes of seed 999 (never used in training) with `inspector eval`, and appends a
# line per step to RUN/curve.tsv: binary F1, citation accuracy, box precision and recall, and
# each hazard's F1. Steps already in the file are skipped, so run it now and then while a long
# stage trains (`train` keeps only its newest checkpoints). Needs jq. Draws the curves as charts
# too when the chart example is built (see the end).
#
# Usage: tools/demo/curve.sh RUN [N]      (RUN: a `train --full` output folder, e.g. WORK/base)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
RUN="$1"
N="${2:-200}"
BIN="${INSPECTOR_BIN:-$ROOT/target/release/inspector}"
command -v jq > /dev/null || { echo "curve.sh needs jq (apt-get install jq)" >&2; exit 1; }
SCENES="$RUN/.curve-scenes-$N"
if [ ! -f "$SCENES/annotations.jsonl" ]; then
  rm -rf "$SCENES"
  "$BIN" synth --n "$N" --seed 999 --size 320 --out "$SCENES" > /dev/null
fi
OUT="$RUN/curve.tsv"
RULES=$(jq -r '.[]' <<'EOF'
["《安全作业规程》第3.1条","《安全作业规程》第3.2条","《安全作业规程》第7.1条","《现场管理标准》第2.2条","《现场管理标准》第2.3.1条","《现场管理标准》第3.2条","《电气安全规程》第12条"]
EOF
)
if [ ! -f "$OUT" ]; then
  printf 'step\tbinary_f1\tcitation_accuracy\tbox_precision\tbox_recall' > "$OUT"
  for k in no-helmet no-vest bad-lift walkway-debris blocked-exit stack-too-high cabinet-no-lockout; do
    printf '\tf1_%s' "$k" >> "$OUT"
  done
  printf '\n' >> "$OUT"
fi
score() {
  local step="$1" model="$2"
  if cut -f1 "$OUT" | grep -qx "$step"; then
    return
  fi
  local report
  report=$("$BIN" eval --data "$SCENES/annotations.jsonl" --model "$model" --json \
    --db "$SCENES/rules.sqlite" 2> /dev/null)
  local line
  line=$(jq -r --arg step "$step" '[$step, .binary.f1, .citation_accuracy, .box.precision, .box.recall] | @tsv' <<< "$report")
  while IFS= read -r rule; do
    line+=$'\t'$(jq -r --arg r "$rule" '.per_rule[$r].f1 // 0' <<< "$report")
  done <<< "$RULES"
  echo "$line" >> "$OUT"
  echo "step $step: $(cut -f2-5 <<< "$line")"
}
for dir in "$RUN"/checkpoints/step-*/; do
  [ -d "$dir/model" ] || continue
  step="${dir%/}"
  score "${step##*step-}" "$dir/model"
done
if [ -f "$RUN/model/config.json" ]; then
  final=$(jq -r '[.[] | select(.step != null) | .step] | max // empty' -s "$RUN/metrics.jsonl" 2> /dev/null || true)
  score "${final:-final}" "$RUN/model"
fi
sort -n -o "$OUT.body" <(tail -n +2 "$OUT")
{ head -1 "$OUT"; cat "$OUT.body"; } > "$OUT.tmp" && mv "$OUT.tmp" "$OUT" && rm -f "$OUT.body"

# The curves as charts (RUN/curve.png, RUN/curve-hazards.png) when the chart example is built:
# `cargo build --release -p inspector-charts --example tsv` (the model card's charts).
CHART="$ROOT/target/release/examples/tsv"
if [ -x "$CHART" ] && [ "$(wc -l < "$OUT")" -gt 1 ]; then
  "$CHART" "$OUT" "$RUN/curve.png" "Held-out metrics ($N scenes of seed 999)" score \
    binary_f1 citation_accuracy box_precision box_recall
  "$CHART" "$OUT" "$RUN/curve-hazards.png" "Held-out F1 per hazard ($N scenes of seed 999)" F1 \
    f1_no-helmet f1_no-vest f1_bad-lift f1_walkway-debris f1_blocked-exit f1_cabinet-no-lockout
  echo "charts: $RUN/curve.png, $RUN/curve-hazards.png"
fi
