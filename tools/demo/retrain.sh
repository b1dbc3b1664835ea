#!/usr/bin/env bash
# Retrains the bundled demo model (models/demo) from scratch on this machine's CPUs, then
# evaluates it. Every step is seeded: the same seeds give the same scenes, tokenizer and
# initial weights; training results agree within float-summation noise across thread counts.
#
# Usage: tools/demo/retrain.sh [WORK_DIR] [--install]
#   WORK_DIR   scratch folder (default /tmp/inspector-demo); about 1 GB
#   --install  copy the result over models/demo/base and models/demo/adapter
# Environment: STAGE0_STEPS, STAGE1_STEPS, STAGE2A_STEPS and STAGE2_STEPS shorten the run (the
# ignored test `demo_retrain_shortened` uses them).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${1:-/tmp/inspector-demo}"
INSTALL="${2:-}"
STAGE0_STEPS="${STAGE0_STEPS:-1500}"
STAGE1_STEPS="${STAGE1_STEPS:-2400}"
STAGE2A_STEPS="${STAGE2A_STEPS:-300}"
STAGE2_STEPS="${STAGE2_STEPS:-900}"
BATCH=8
BIN="${INSPECTOR_BIN:-$ROOT/target/release/inspector}"
if [ ! -x "$BIN" ]; then
  (cd "$ROOT" && cargo build --release --locked -p inspector-cli)
fi
mkdir -p "$WORK"
DB="$WORK/rules.sqlite"
PIX=(--min-pixels 3136 --max-pixels 60000)
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

stamp "scenes"
# The tokenizer corpus shows every hazard (it teaches words, not what they look like).
"$BIN" synth --n 2000 --seed 3 --size 320 --out "$WORK/corpus"
# Stage 1 never shows the held-out hazard (stack-too-high); stage 2 teaches it.
"$BIN" synth --n $(( STAGE1_STEPS * BATCH )) --seed 1 --size 320 --exclude stack-too-high --out "$WORK/stage1"
# Stage 2 goes over its scenes three times.
"$BIN" synth --n $(( STAGE2_STEPS * BATCH / 3 )) --seed 2 --size 320 --boost stack-too-high --out "$WORK/stage2"

stamp "tokenizer and initial weights"
"$BIN" dataset build "$WORK/corpus/annotations.jsonl" --out "$WORK/corpus/conversations.jsonl" --db "$DB"
rm -rf "$WORK/init"
"$BIN" model init --config "$ROOT/tools/demo/config.json" \
  --tokenizer-corpus "$WORK/corpus/conversations.jsonl" --out "$WORK/init" --seed 0 --prompt brief

stamp "stage 0: vision tower pretrained on the boxes"
rm -rf "$WORK/vision"
"$BIN" pretrain-vision --model "$WORK/init" --data "$WORK/stage1/annotations.jsonl" \
  --out "$WORK/vision" --steps "$STAGE0_STEPS" --batch-size 16 --lr 2e-3 --seed 0 \
  --db "$DB" "${PIX[@]}"

stamp "stage 1: full training"
rm -rf "$WORK/base"
"$BIN" train --model "$WORK/vision/model" --data "$WORK/stage1/annotations.jsonl" --out "$WORK/base" \
  --full --lr 1e-3 --batch-size $BATCH --grad-accum 1 --max-steps "$STAGE1_STEPS" \
  --save-every 200 --seed 1 --db "$DB" "${PIX[@]}"

# Stage 2 teaches the held-out hazard without changing the base: first a vision adapter learns
# the new hazard's boxes (the tower itself stays frozen), then the language model's adapter is
# trained on top of it, continuing the vision adapter.
stamp "stage 2a: vision adapter on the boxes"
rm -rf "$WORK/vision2"
"$BIN" pretrain-vision --model "$WORK/base/model" --data "$WORK/stage2/annotations.jsonl" \
  --out "$WORK/vision2" --steps "$STAGE2A_STEPS" --batch-size 16 --lr 3e-3 --seed 2 \
  --lora-r 16 --lora-alpha 32 --db "$DB" "${PIX[@]}"

# Stage 2b learns the held-out hazard's findings from the annotations and every other finding
# from the base's own answers for the same scenes (learning without forgetting): the adapter
# adds the new hazard to what the base answers instead of relearning the other hazards.
stamp "stage 2b data: the base's answers for the other hazards"
"$BIN" dataset complete "$WORK/stage2/annotations.jsonl" --keep "《现场管理标准》第3.2条" \
  --out "$WORK/stage2/completed.jsonl" --model "$WORK/base/model" --batch-size 32 --db "$DB"

stamp "stage 2b: LoRA for the held-out hazard"
rm -rf "$WORK/lora"
"$BIN" train --model "$WORK/base/model" --data "$WORK/stage2/completed.jsonl" --out "$WORK/lora" \
  --init-adapter "$WORK/vision2/adapter" --lora-vision --lora-r 16 --lora-alpha 32 --lora-dropout 0.05 --lr 2e-3 \
  --batch-size $BATCH --grad-accum 1 --max-steps "$STAGE2_STEPS" \
  --save-every 200 --seed 2 --db "$DB" "${PIX[@]}"
stamp "training done"

# Whether this run reproduced the bundled weights bit for bit. The same seeds and step counts on
# a 2-core machine of the kind that trained them do; another CPU or thread count may change float
# sums, and then tools/demo/evaluate.sh (DEMO=...) compares the metrics instead.
same=yes
for f in "$ROOT"/models/demo/base/*.safetensors "$WORK"/base/model/*.safetensors; do
  name="$(basename "$f")"
  cmp -s "$ROOT/models/demo/base/$name" "$WORK/base/model/$name" || same=no
done
cmp -s "$ROOT/models/demo/adapter/adapter_model.safetensors" \
  "$WORK/lora/adapter/adapter_model.safetensors" || same=no
if [ "$same" = yes ]; then
  stamp "the base's and the adapter's weights are byte-identical to models/demo"
else
  stamp "the weights differ from models/demo (expected for a shortened run or another CPU)"
fi

if [ "$INSTALL" = "--install" ]; then
  rm -rf "$ROOT/models/demo/base" "$ROOT/models/demo/adapter"
  mkdir -p "$ROOT/models/demo"
  cp -r "$WORK/base/model" "$ROOT/models/demo/base"
  cp -r "$WORK/lora/adapter" "$ROOT/models/demo/adapter"
  stamp "installed into models/demo"
fi
