#!/usr/bin/env bash
# llama.cpp CPU reference benchmark for Qwen2-VL.
#
# Converts a Hugging Face Qwen2-VL checkpoint (Qwen2VLForConditionalGeneration: config.json,
# model.safetensors[.index.json], tokenizer.json, tokenizer_config.json / chat_template.json)
# into GGUF with llama.cpp's convert_hf_to_gguf.py (text model at f16, vision projector
# "mmproj" at f16 and q8_0), quantizes the text model with llama-quantize, and then runs
# llama-mtmd-cli once per configuration on one image + prompt: greedy (temp 0), exactly N
# generated tokens (--ignore-eos -n N). Each run is timed with /usr/bin/time -v (wall time,
# peak RSS) and llama.cpp's own timings are parsed from its log. One JSON line per
# configuration goes to stdout; everything else goes to stderr or to the work dir.
#
# Conversions and quantizations are cached in WORK_DIR (keyed on the model dir's path and the
# size/mtime of its config, tokenizer and weight files), so a second run only benchmarks.
#
# Usage:
#   LLAMACPP_DIR=/path/to/llama.cpp PYTHON=/path/to/venv/bin/python \
#     tools/bench/llamacpp.sh MODEL_DIR IMAGE [PROMPT]
# or with everything in the environment:
#   LLAMACPP_DIR=... PYTHON=... MODEL_DIR=... IMAGE=... PROMPT=... N=64 WORK_DIR=... \
#     tools/bench/llamacpp.sh
#
# Environment:
#   LLAMACPP_DIR  llama.cpp source tree (with convert_hf_to_gguf.py, gguf-py/) built into
#                 build/ (needs the targets llama-mtmd-cli and llama-quantize). Required.
#   LLAMACPP_BIN  directory of the llama.cpp binaries (default: $LLAMACPP_DIR/build/bin).
#   PYTHON        Python for the converter (needs torch, transformers, safetensors, numpy,
#                 sentencepiece; gguf is taken from $LLAMACPP_DIR/gguf-py). Default: python3.
#   MODEL_DIR, IMAGE, PROMPT  as the positional arguments (PROMPT default below).
#   N             generated tokens per run (default 64).
#   WORK_DIR      cache + logs (default: /tmp/llamacpp-bench/<basename of MODEL_DIR>).
#   THREADS       -t for llama-mtmd-cli (default 2).
#   CTX           -c context size (default 1024; must hold image tokens + prompt + N).
#   CONFIGS       space-separated TEXT_TYPE:MMPROJ_TYPE pairs; TEXT_TYPE is f16 or any
#                 llama-quantize type (Q8_0, Q4_K_S, Q4_K_M, ...), MMPROJ_TYPE is f16 or q8_0.
#                 Default: "Q8_0:q8_0 Q4_K_S:q8_0"; MMPROJ_F16=1 appends "Q8_0:f16 Q4_K_S:f16".
#
# Output line per configuration, e.g.:
#   {"config":"text-Q8_0+mmproj-q8_0","wall_s":1.23,"peak_rss_mb":456.7,"image_encode_ms":120,
#    "prompt_tok_s":300.1,"decode_tok_s":25.3, ...extra fields...}
# image_encode_ms is the vision encoder (mmproj) time; prompt_tok_s covers the LLM prefill of
# the image tokens and the text prompt together (llama.cpp's "prompt eval"); decode_tok_s is
# llama.cpp's "eval" rate over the single-token decodes it timed (N-1 of the N: the last
# token's decode is still in flight when llama.cpp prints its stats; n_decode says how many).
# wall_s includes model loading and llama.cpp's warm-up run.
#
# The converter identifies BPE pre-tokenizers by hashing the token ids of a fixed test string
# (get_vocab_base_pre) and refuses unknown hashes. Tokenizers trained by our own tooling hash
# differently from Qwen's, so this script patches the converter in LLAMACPP_DIR (once,
# idempotently, marked BENCH-PATCH) to treat an unknown hash as "qwen2" (same split regex).
# Real Qwen2-VL tokenizers are recognised before the patched line is reached. A second patch
# lets vision towers shallower than 3 blocks convert (see patch_converter below).
set -euo pipefail

die() { echo "llamacpp.sh: error: $*" >&2; exit 1; }
log() { echo "llamacpp.sh: $*" >&2; }

# ---- inputs ---------------------------------------------------------------------------------
MODEL_DIR="${1:-${MODEL_DIR:-}}"
IMAGE="${2:-${IMAGE:-}}"
PROMPT="${3:-${PROMPT:-Describe this image. List every safety hazard you can see.}}"
N="${N:-64}"
THREADS="${THREADS:-2}"
CTX="${CTX:-1024}"
PYTHON="${PYTHON:-python3}"
: "${LLAMACPP_DIR:?set LLAMACPP_DIR to the llama.cpp source tree (built into build/)}"
[[ -n "$MODEL_DIR" ]] || die "MODEL_DIR missing (first argument or env)"
[[ -n "$IMAGE" ]] || die "IMAGE missing (second argument or env)"
LLAMACPP_DIR="$(cd "$LLAMACPP_DIR" && pwd)"
MODEL_DIR="$(cd "$MODEL_DIR" && pwd)"
[[ -f "$IMAGE" ]] || die "image not found: $IMAGE"
IMAGE="$(cd "$(dirname "$IMAGE")" && pwd)/$(basename "$IMAGE")"
LLAMACPP_BIN="${LLAMACPP_BIN:-$LLAMACPP_DIR/build/bin}"
WORK_DIR="${WORK_DIR:-/tmp/llamacpp-bench/$(basename "$MODEL_DIR")}"
CONFIGS="${CONFIGS:-Q8_0:q8_0 Q4_K_S:q8_0}"
if [[ "${MMPROJ_F16:-0}" == 1 ]]; then CONFIGS="$CONFIGS Q8_0:f16 Q4_K_S:f16"; fi

[[ "$N" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$N'"
[[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || die "THREADS must be a positive integer, got '$THREADS'"
[[ "$CTX" =~ ^[1-9][0-9]*$ ]] || die "CTX must be a positive integer, got '$CTX'"
CONVERT="$LLAMACPP_DIR/convert_hf_to_gguf.py"
MTMD_CLI="$LLAMACPP_BIN/llama-mtmd-cli"
QUANTIZE="$LLAMACPP_BIN/llama-quantize"
[[ -f "$CONVERT" ]] || die "no convert_hf_to_gguf.py in $LLAMACPP_DIR"
[[ -x "$MTMD_CLI" ]] || die "no llama-mtmd-cli in $LLAMACPP_BIN (build it first)"
[[ -x "$QUANTIZE" ]] || die "no llama-quantize in $LLAMACPP_BIN (build it first)"
[[ -f "$MODEL_DIR/config.json" ]] || die "no config.json in $MODEL_DIR"
"$PYTHON" -c 'import torch, transformers, numpy, safetensors' \
  || die "PYTHON=$PYTHON lacks the converter's requirements (torch, transformers, numpy, safetensors)"

# GNU time (not the shell keyword) gives wall time and peak RSS.
if [[ ! -x /usr/bin/time ]]; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    log "installing GNU time via apt-get"
    apt-get install -y -qq time >&2 || die "apt-get install time failed (run apt-get update first?)"
  fi
  [[ -x /usr/bin/time ]] || die "/usr/bin/time missing: apt-get install time"
fi

mkdir -p "$WORK_DIR"

# ---- converter patches (applied to the llama.cpp copy in LLAMACPP_DIR, never to this repo) ----
# 1. get_vocab_base_pre: an unknown BPE pre-tokenizer hash becomes "qwen2" instead of raising
#    NotImplementedError. Recent llama.cpp keeps it in conversion/base.py, older trees in
#    convert_hf_to_gguf.py.
# 2. MmprojModel: the tensor-name map is built for max(depth, 3) blocks. The Qwen2-VL merger's
#    "visual.merger.mlp.{0,2}" names are mapped through block ids, so a vision tower of depth
#    < 3 (our tiny test fixtures) otherwise fails with "Can not map tensor
#    'visual.merger.mlp.2.bias'". No effect on real checkpoints (depth 32).
# Both are idempotent (lines marked BENCH-PATCH).
patch_converter() {
  local f done1="" raise_re='raise NotImplementedError("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()")'
  for f in "$LLAMACPP_DIR/conversion/base.py" "$LLAMACPP_DIR/convert_hf_to_gguf.py"; do
    [[ -f "$f" ]] || continue
    if grep -q 'BENCH-PATCH: treat unknown' "$f"; then done1=1; break; fi
    if grep -qF "$raise_re" "$f"; then
      log "patching $f: unknown BPE pre-tokenizer -> qwen2"
      sed -i 's/^\( *\)raise NotImplementedError("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()")$/\1res = "qwen2"  # BENCH-PATCH: treat unknown BPE pre-tokenizers as qwen2/' "$f"
      grep -q 'BENCH-PATCH: treat unknown' "$f" || die "patching $f failed"
      done1=1; break
    fi
  done
  [[ -n "$done1" ]] || die "could not find get_vocab_base_pre's NotImplementedError in $LLAMACPP_DIR to patch"

  local map_re='self.tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, self.block_count)'
  for f in "$LLAMACPP_DIR/conversion/base.py" "$LLAMACPP_DIR/convert_hf_to_gguf.py"; do
    [[ -f "$f" ]] || continue
    if grep -q 'BENCH-PATCH: min 3 blocks' "$f"; then return 0; fi
    if grep -qF "$map_re" "$f"; then
      log "patching $f: mmproj tensor map for at least 3 blocks"
      sed -i 's/^\( *\)self\.tensor_map = gguf\.get_tensor_name_map(gguf\.MODEL_ARCH\.MMPROJ, self\.block_count)$/\1self.tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(self.block_count, 3))  # BENCH-PATCH: min 3 blocks/' "$f"
      grep -q 'BENCH-PATCH: min 3 blocks' "$f" || die "patching $f failed"
      return 0
    fi
  done
  log "warning: mmproj tensor-map line not found; vision towers of depth < 3 may not convert"
}
patch_converter

# ---- conversion cache -----------------------------------------------------------------------
# The cache is valid while the model dir's files are unchanged (path, size, mtime).
stamp="$(cd "$MODEL_DIR" && { echo "$MODEL_DIR"; stat -c '%n %s %Y' -- *.json *.safetensors 2>/dev/null || true; } | sort)"
if [[ ! -f "$WORK_DIR/source.stamp" ]] || [[ "$(cat "$WORK_DIR/source.stamp")" != "$stamp" ]]; then
  log "model dir changed or new: clearing cached GGUFs in $WORK_DIR"
  rm -f "$WORK_DIR"/*.gguf "$WORK_DIR"/*.partial "$WORK_DIR/source.stamp"
fi

# convert OUT [extra converter args...]: runs the converter into OUT.partial, then renames.
convert() {
  local out="$1"; shift
  if [[ -s "$out" ]]; then log "cached: $out"; return 0; fi
  log "converting -> $out"
  local t0=$SECONDS
  "$PYTHON" "$CONVERT" "$MODEL_DIR" --outfile "$out.partial" "$@" >"$out.convert.log" 2>&1 \
    || { tail -n 30 "$out.convert.log" >&2; die "conversion failed (log: $out.convert.log)"; }
  [[ -s "$out.partial" ]] || die "converter wrote nothing to $out.partial"
  mv -f "$out.partial" "$out"
  log "converted in $((SECONDS - t0)) s"
}

# text_gguf TYPE: path of the text model at TYPE (f16 or a llama-quantize type), made on demand.
text_gguf() {
  local type="$1" f16="$WORK_DIR/text-f16.gguf"
  convert "$f16" --outtype f16
  if [[ "$type" == f16 ]]; then echo "$f16"; return 0; fi
  local out="$WORK_DIR/text-$type.gguf"
  if [[ ! -s "$out" ]]; then
    log "quantizing -> $out"
    "$QUANTIZE" "$f16" "$out.partial" "$type" "$THREADS" >"$out.quantize.log" 2>&1 \
      || { tail -n 30 "$out.quantize.log" >&2; die "llama-quantize $type failed (log: $out.quantize.log)"; }
    mv -f "$out.partial" "$out"
  else
    log "cached: $out"
  fi
  echo "$out"
}

# mmproj_gguf TYPE: path of the vision projector at TYPE (f16 or q8_0, the converter's types).
mmproj_gguf() {
  local type="$1"
  case "$type" in f16|q8_0|bf16|f32) ;; *) die "mmproj type must be f16, q8_0, bf16 or f32, got '$type'";; esac
  local out="$WORK_DIR/mmproj-$type.gguf"
  convert "$out" --mmproj --outtype "$type"
  echo "$out"
}

# ---- parsing helpers ------------------------------------------------------------------------
# num NAME VALUE: checks VALUE is a plain decimal number and prints it; dies otherwise.
num() {
  [[ "$2" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "could not parse $1 (got '${2}') from $3"
  echo "$2"
}

# ---- benchmark ------------------------------------------------------------------------------
echo "$stamp" >"$WORK_DIR/source.stamp"
llama_version="$("$MTMD_CLI" --version 2>&1 | grep -m1 -i 'version' || true)"
log "llama.cpp: ${llama_version:-unknown version}"
for cfg in $CONFIGS; do
  [[ "$cfg" == *:* ]] || die "bad CONFIGS entry '$cfg' (want TEXT_TYPE:MMPROJ_TYPE)"
  ttype="${cfg%%:*}"; mtype="${cfg#*:}"
  text="$(text_gguf "$ttype")"
  mmproj="$(mmproj_gguf "$mtype")"
  name="text-$ttype+mmproj-$mtype"
  run_log="$WORK_DIR/run-$name.log"
  time_log="$WORK_DIR/run-$name.time"
  log "running $name"
  /usr/bin/time -v -o "$time_log" \
    "$MTMD_CLI" -m "$text" --mmproj "$mmproj" --image "$IMAGE" -p "$PROMPT" \
      -n "$N" --ignore-eos --temp 0 --seed 0 -t "$THREADS" -c "$CTX" -lv 4 \
      </dev/null >"$run_log" 2>&1 \
    || { tail -n 40 "$run_log" >&2; die "llama-mtmd-cli failed for $name (log: $run_log)"; }

  # GNU time: "Elapsed (wall clock) time (h:mm:ss or m:ss): 0:01.23", RSS in kbytes.
  # (Each grep/sed below may find nothing; num() then fails loudly with the file to look at.)
  elapsed="$(sed -n 's/^[[:space:]]*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$time_log")"
  wall_s="$(awk -v t="$elapsed" 'BEGIN { n = split(t, p, ":"); s = 0;
    for (i = 1; i <= n; i++) s = s * 60 + p[i]; if (n < 2) exit 1; printf "%.3f", s }')" \
    || die "could not parse wall time '$elapsed' from $time_log"
  wall_s="$(num wall_s "$wall_s" "$time_log")"
  rss_kb="$(sed -n 's/^[[:space:]]*Maximum resident set size (kbytes): //p' "$time_log")"
  rss_kb="$(num peak_rss "$rss_kb" "$time_log")"
  peak_rss_mb="$(awk -v k="$rss_kb" 'BEGIN { printf "%.1f", k / 1024 }')"

  # Vision encoder time: "mtmd batch encoding done in X ms" (this llama.cpp), or the older
  # helper's "image slice encoded in X ms"; summed over batches/slices.
  enc="$(grep -Eo '(mtmd batch encoding done|image slice encoded) in [0-9]+ ms' "$run_log" \
    | awk '{ s += $(NF-1); n++ } END { if (n) print s }' || true)"
  image_encode_ms="$(num image_encode_ms "$enc" "$run_log")"
  # LLM prefill of the image embeddings: "image decoded (batch 1/1) in X ms" (informative).
  img_dec="$(grep -Eo 'image decoded \(batch [0-9]+/[0-9]+\) in [0-9]+ ms' "$run_log" \
    | awk '{ s += $(NF-1); n++ } END { if (n) print s }' || true)"
  image_decode_ms="$(num image_decode_ms "$img_dec" "$run_log")"

  # llama_perf_context_print:
  #   "prompt eval time = X ms / T tokens ( ... ms per token, R tokens per second)"
  #   "       eval time = X ms / R runs   ( ... ms per token, S tokens per second)"
  pline="$(grep -E 'llama_perf_context_print: +prompt eval time' "$run_log" | tail -n 1 || true)"
  eline="$(grep -E 'llama_perf_context_print: +eval time' "$run_log" | tail -n 1 || true)"
  [[ -n "$pline" ]] || die "no 'prompt eval time' line in $run_log"
  [[ -n "$eline" ]] || die "no 'eval time' line in $run_log"
  perf_re='= *([0-9.]+) ms / *([0-9]+) (tokens|runs) .* ([0-9.]+) tokens per second\)'
  [[ "$pline" =~ $perf_re ]] || die "could not parse prompt eval line: $pline"
  prompt_ms="$(num prompt_eval_ms "${BASH_REMATCH[1]}" "$run_log")"
  n_prompt="$(num n_prompt_tokens "${BASH_REMATCH[2]}" "$run_log")"
  prompt_tok_s="$(num prompt_tok_s "${BASH_REMATCH[4]}" "$run_log")"
  [[ "$eline" =~ $perf_re ]] || die "could not parse eval line: $eline"
  decode_ms="$(num decode_ms "${BASH_REMATCH[1]}" "$run_log")"
  n_decode="$(num n_decode "${BASH_REMATCH[2]}" "$run_log")"
  decode_tok_s="$(num decode_tok_s "${BASH_REMATCH[4]}" "$run_log")"
  # N tokens are sampled (--ignore-eos) and each is fed back, but the last one's decode is still
  # in flight (never synchronised) when the stats are printed, so llama.cpp counts N-1 runs.
  (( n_decode == N - 1 || n_decode == N )) \
    || die "$name: llama.cpp counted $n_decode decode runs, expected N-1=$((N - 1)) (log: $run_log)"

  printf '{"config":"%s","wall_s":%s,"peak_rss_mb":%s,"image_encode_ms":%s,"prompt_tok_s":%s,"decode_tok_s":%s,"image_decode_ms":%s,"prompt_eval_ms":%s,"n_prompt_tokens":%s,"decode_ms":%s,"n_decode":%s,"threads":%s,"ctx":%s,"text_gguf_mb":%s,"mmproj_gguf_mb":%s}\n' \
    "$name" "$wall_s" "$peak_rss_mb" "$image_encode_ms" "$prompt_tok_s" "$decode_tok_s" \
    "$image_decode_ms" "$prompt_ms" "$n_prompt" "$decode_ms" "$n_decode" "$THREADS" "$CTX" \
    "$(awk -v b="$(stat -c %s "$text")" 'BEGIN { printf "%.1f", b / 1048576 }')" \
    "$(awk -v b="$(stat -c %s "$mmproj")" 'BEGIN { printf "%.1f", b / 1048576 }')"
done
