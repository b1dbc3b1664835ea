#!/usr/bin/env bash
# Retrains the bundled demo model (models/demo) from scratch on this machine's CPUs. Every step
# is seeded: the same seeds give the same scenes, tokenizer and initial weights; training
# results agree within float-summation noise across CPUs and thread counts.
#
# The whole recipe takes hours on 2 cores, so it can stop and go on: run it again with the same
# WORK_DIR and it skips the stages that finished, and the long training stages continue from
# their newest checkpoint (`train --resume`, which continues the very run that stopped).
# WORK_DIR/times.tsv records each stage's wall time (summed over the sittings it took).
#
# Usage: tools/demo/retrain.sh [WORK_DIR] [--install]
#   WORK_DIR   scratch folder (default /tmp/inspector-demo); about 1 GB
#   --install  copy the result over models/demo/base and models/demo/adapter
# Environment: STAGE0_STEPS, STAGE1_STEPS, STAGE2A_STEPS and STAGE2_STEPS shorten the run, and
# SAVE_EVERY sets the training stages' checkpoint interval (the ignored test
# `demo_retrain_shortened` uses them, and stops and continues a run).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${1:-/tmp/inspector-demo}"
INSTALL="${2:-}"
STAGE0_STEPS="${STAGE0_STEPS:-4000}"
STAGE1_STEPS="${STAGE1_STEPS:-16000}"
STAGE2A_STEPS="${STAGE2A_STEPS:-300}"
STAGE2_STEPS="${STAGE2_STEPS:-900}"
SAVE_EVERY="${SAVE_EVERY:-200}"
BATCH=8
SIZE=320
BIN="${INSPECTOR_BIN:-$ROOT/target/release/inspector}"
if [ ! -x "$BIN" ]; then
  (cd "$ROOT" && cargo build --release --locked -p inspector-cli)
fi
mkdir -p "$WORK/done"
DB="$WORK/rules.sqlite"
PIX=(--min-pixels 3136 --max-pixels 60000)
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

# Adds seconds to a stage's line in times.tsv.
add_time() {
  local before
  before=$(awk -F'\t' -v s="$1" '$1 == s { print $2 }' "$WORK/times.tsv" 2>/dev/null || true)
  { grep -v "^$1	" "$WORK/times.tsv" 2>/dev/null || true; printf '%s\t%s\n' "$1" "$(( ${before:-0} + $2 ))"; } > "$WORK/times.tsv.tmp"
  mv "$WORK/times.tsv.tmp" "$WORK/times.tsv"
}

# Runs a stage unless an earlier sitting finished it, and adds this sitting's wall time to the
# stage's line in times.tsv. A sitting killed outright (the machine stopped) counts up to its
# last write into WORK (metrics lines come every 10 steps, checkpoints every SAVE_EVERY).
stage() {
  local name="$1"
  shift
  if [ -e "$WORK/done/$name" ]; then
    stamp "$name: finished earlier"
    return
  fi
  if [ -e "$WORK/done/$name.started" ]; then
    local s0 last
    s0=$(cat "$WORK/done/$name.started")
    last=$(find "$WORK" -path "$WORK/done" -prune -o -type f -printf '%T@\n' | sort -n | tail -1 | cut -d. -f1)
    add_time "$name" $(( last > s0 ? last - s0 : 0 ))
    stamp "$name: an earlier sitting was stopped in it; going on"
  else
    stamp "$name"
  fi
  local start
  start=$(date +%s)
  echo "$start" > "$WORK/done/$name.started"
  local status=0
  "$@" || status=$?
  add_time "$name" $(( $(date +%s) - start ))
  rm -f "$WORK/done/$name.started"
  [ "$status" -eq 0 ] || exit "$status"
  touch "$WORK/done/$name"
}

# `train` continues from its newest checkpoint when an earlier sitting stopped it.
resume_flag() {
  if [ -d "$1/checkpoints" ] && [ -n "$(ls -A "$1/checkpoints")" ]; then
    echo --resume
  else
    rm -rf "$1"
  fi
}

scenes() {
  rm -rf "$WORK/corpus" "$WORK/stage2"
  # The tokenizer corpus shows every hazard (it teaches words, not what they look like).
  "$BIN" synth --n 2000 --seed 3 --size $SIZE --out "$WORK/corpus"
  # Stage 2 goes over its scenes three times; they are files because stage 2b's data comes
  # from the base model's answers for them (`dataset complete`).
  "$BIN" synth --n $(( STAGE2_STEPS * BATCH / 3 )) --seed 2 --size $SIZE --boost stack-too-high --out "$WORK/stage2"
}

init() {
  "$BIN" dataset build "$WORK/corpus/annotations.jsonl" --out "$WORK/corpus/conversations.jsonl" --db "$DB"
  rm -rf "$WORK/init"
  "$BIN" model init --config "$ROOT/tools/demo/config.json" \
    --tokenizer-corpus "$WORK/corpus/conversations.jsonl" --out "$WORK/init" --seed 0 --prompt brief
}

# Stages 0 and 1 never show the held-out hazard (stack-too-high); stage 2 teaches it. They learn
# from fresh scenes, rendered when their batch comes (`--data synth:…`): no scene is seen twice.
# Stage 0 also learns each covered token's box edges (--box-loss): the language model has to
# write boxes out, and reads them best from tokens that carry them.
stage0() {
  rm -rf "$WORK/vision"
  "$BIN" pretrain-vision --model "$WORK/init" \
    --data "synth:n=$(( STAGE0_STEPS * 16 )),seed=1,size=$SIZE,exclude=stack-too-high" \
    --out "$WORK/vision" --steps "$STAGE0_STEPS" --batch-size 16 --lr 2e-3 --box-loss 0.25 --seed 0 \
    --db "$DB" "${PIX[@]}"
}

stage1() {
  local resume
  resume=$(resume_flag "$WORK/base")
  "$BIN" train --model "$WORK/vision/model" \
    --data "synth:n=$(( STAGE1_STEPS * BATCH )),seed=4,size=$SIZE,exclude=stack-too-high" \
    --out "$WORK/base" --full --lr 1e-3 --batch-size $BATCH --grad-accum 1 \
    --max-steps "$STAGE1_STEPS" --save-every "$SAVE_EVERY" --seed 1 --db "$DB" "${PIX[@]}" $resume
}

# Stage 2 teaches the held-out hazard without changing the base: first a vision adapter learns
# the new hazard's boxes (the tower itself stays frozen), then the language model's adapter is
# trained on top of it, continuing the vision adapter.
stage2a() {
  rm -rf "$WORK/vision2"
  "$BIN" pretrain-vision --model "$WORK/base/model" --data "$WORK/stage2/annotations.jsonl" \
    --out "$WORK/vision2" --steps "$STAGE2A_STEPS" --batch-size 16 --lr 3e-3 --seed 2 \
    --lora-r 16 --lora-alpha 32 --db "$DB" "${PIX[@]}"
}

# Stage 2b learns the held-out hazard's findings from the annotations and every other finding
# from the base's own answers for the same scenes (learning without forgetting): the adapter
# adds the new hazard to what the base answers instead of relearning the other hazards.
stage2b_data() {
  "$BIN" dataset complete "$WORK/stage2/annotations.jsonl" --keep "《现场管理标准》第3.2条" \
    --out "$WORK/stage2/completed.jsonl" --model "$WORK/base/model" --batch-size 32 --db "$DB"
}

stage2b() {
  local resume
  resume=$(resume_flag "$WORK/lora")
  "$BIN" train --model "$WORK/base/model" --data "$WORK/stage2/completed.jsonl" --out "$WORK/lora" \
    --init-adapter "$WORK/vision2/adapter" --lora-vision --lora-r 16 --lora-alpha 32 --lora-dropout 0.05 --lr 2e-3 \
    --batch-size $BATCH --grad-accum 1 --max-steps "$STAGE2_STEPS" \
    --save-every "$SAVE_EVERY" --seed 2 --db "$DB" "${PIX[@]}" $resume
}

stage scenes scenes
stage init init
stage stage0 stage0
stage stage1 stage1
stage stage2a stage2a
stage stage2b-data stage2b_data
stage stage2b stage2b
stamp "training done; wall time of each stage (s):"
cat "$WORK/times.tsv"

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
  # The metadata records the paths each stage read (`base_model`, `init_adapter`); keep them
  # relative to WORK, so the bundled files name no scratch folder of this machine.
  sed -i "s#\"$WORK/#\"#g" "$ROOT"/models/demo/base/*.json "$ROOT"/models/demo/adapter/*.json
  stamp "installed into models/demo"
fi
