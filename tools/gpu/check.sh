#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with target/gpu-bundle.tar.xz carried
# there (tools/gpu/build.sh makes it). At most 8 minutes; prints one report and writes it,
# with the benchmark table and the logs, to $OUT (the device tool's folder), else
# target/gpu-out:
#   1. the `_cuda` instances of the device-parameterised tests: f32 logits against the
#      transformers fixtures (≤ 1e-4, TF32 off), bf16 error, KV-cache decode against the full
#      forward, every LoRA gradient against PEFT's (≤ 1e-4), and the CLI's device errors;
#   2. the benchmark against transformers (+ PEFT) on this GPU (crates/cli/benches/gpu.rs);
#   3. end to end: 20 LoRA steps of the 2B shapes on synthetic scenes must lower the loss, and
#      `detect` must run with the adapter they wrote.
# Each part reports PASS or FAIL; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
tree=$PWD
out=${OUT:-$tree/target/gpu-out}
mkdir -p "$out"
report=$out/gpu-report.md
: > "$report"
say() { echo "$*" | tee -a "$report"; }
python=${PYTHON:-python3}
work=$(mktemp -d)
tar -C "$work" -xJf "$tree/target/gpu-bundle.tar.xz"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
# The test binaries find their fixtures under the path they were built in.
built=$(cat "$work/BUILD_ROOT")
if [[ ! -e $built ]]; then
    mkdir -p "$(dirname "$built")" && ln -s "$tree" "$built"
fi
# The CLI tests run the binary where cargo built it.
install -D "$work/bin/inspector" "$built/target/cuda/release/inspector"
# PEFT (and accelerate) travel as wheels in the bundle when this Python lacks them.
if ! "$python" -c "import peft" 2>/dev/null; then
    "$python" -m pip install --quiet --no-deps --no-index --target "$work/py" "$work"/wheels/*.whl
    export PYTHONPATH=$work/py:${PYTHONPATH:-}
fi
failed=0
part() { # name, command...
    local name=$1; shift
    local t0=$SECONDS
    if "$@" > "$out/$name.log" 2>&1; then
        say "PASS $name ($((SECONDS - t0)) s)"
    else
        say "FAIL $name ($((SECONDS - t0)) s): see $name.log"
        tail -20 "$out/$name.log" | tee -a "$report"
        failed=1
    fi
}

say "# GPU check, $(date -u +%FT%TZ)"
say "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"

# 1. Tests: only the GPU instances (the CPU ones ran in CI).
for t in "$work"/tests/*; do
    part "test-$(basename "$t")" "$t" --test-threads 1 cuda
done
grep -h "test result\|relative error\|differ" "$out"/test-*.log >> "$report" || true

# 2. The benchmark.
part bench env GPU_BENCH_SIZE=2b GPU_BENCH_WORK="$work/bench-work" \
    GPU_BENCH_REPORT="$out/bench.md" INSPECTOR_PYTHON="$python" "$work/bench/gpu"
[[ -f $out/bench.md ]] && cat "$out/bench.md" >> "$report"

# 3. End to end: 20 LoRA steps on the 2B shapes, then detect with the adapter.
e2e() {
    set -e
    local bin=$work/bin/inspector model=$work/bench-work/2b run=$work/e2e
    mkdir -p "$run" && cd "$run"
    "$bin" synth --n 12 --seed 21 --out data
    echo "log_every = 1" > train.toml
    "$bin" train --model "$model" --data data/annotations.jsonl --out lora --max-steps 20 \
        --batch-size 2 --grad-accum 1 --lr 1e-3 --lora-dropout 0 --save-every 20 \
        --config train.toml --device cuda --dtype bf16
    "$python" - lora/metrics.jsonl <<'PY'
import json, sys
losses = [r["loss"] for r in map(json.loads, open(sys.argv[1])) if r.get("kind", "train") == "train" and "loss" in r]
first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
print(f"LoRA loss over {len(losses)} logged steps: first three {first:.3f}, last three {last:.3f}")
assert len(losses) >= 6 and last < first, "the loss did not fall"
PY
    "$bin" detect data/images --model "$model" --adapter lora/adapter --device cuda \
        --dtype bf16 --json --no-cache --max-new-tokens 48 > detect.jsonl
    echo "detect: $(wc -l < detect.jsonl) photos answered"
}
part e2e e2e
grep -h "LoRA loss\|photos answered" "$out/e2e.log" >> "$report" || true

say ""
say "device time used: $SECONDS s"
exit $failed
