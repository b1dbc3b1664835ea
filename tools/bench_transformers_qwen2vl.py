#!/usr/bin/env python3
"""The transformers side of `cargo bench -p inspector-qwen2vl --bench real_size`.

Loads the random-weight checkpoint the bench generated, runs the very inputs our side ran
(written by the bench to bench_inputs.safetensors), and prints one JSON line: load, prefill (the
second of two runs) and greedy decode speed with the KV cache (generate() of N + 1 tokens less
one prefill), peak RSS, and the largest difference between its last-position logits and ours.

Pinned: torch 2.15.0, transformers 5.24.0, fp32, default thread count, and transformers'
default attention (sdpa) unless a fourth argument names another ("eager").
Usage: python tools/bench_transformers_qwen2vl.py MODEL_DIR INPUTS.safetensors DECODE_STEPS [ATTN]
"""
import json
import resource
import sys
import time

import torch
from safetensors.torch import load_file
from transformers import Qwen2VLForConditionalGeneration


def main() -> None:
    model_dir, inputs_path, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    t = time.perf_counter()
    attn = sys.argv[4] if len(sys.argv) > 4 else "sdpa"
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attn).eval()
    load_s = time.perf_counter() - t
    inputs = load_file(inputs_path)
    ids = inputs["input_ids"]
    image_pad = model.config.image_token_id
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
              image_grid_thw=inputs["image_grid_thw"], mm_token_type_ids=(ids == image_pad).long())
    prefill = []
    with torch.no_grad():
        # The first run warms up (without a cache, so that the second starts from an empty one).
        for use_cache in (False, True):
            model.model.rope_deltas = None
            t = time.perf_counter()
            out = model(**kw, use_cache=use_cache)
            prefill.append(time.perf_counter() - t)
        logits = out.logits[0, -1]
        diff = (logits - inputs["last_logits"].reshape(-1)).abs().max().item()
        # Decode speed: greedy generate() of steps + 1 tokens, less one prefill.
        model.model.rope_deltas = None
        t = time.perf_counter()
        generated = model.generate(**kw, max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                                   do_sample=False)
        generate_s = time.perf_counter() - t
        assert generated.shape[1] == ids.shape[1] + steps + 1, generated.shape
        decode_s = generate_s - prefill[1]
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve (the bench's own peak).
    with open("/proc/self/status") as f:
        rss_mb = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    print(json.dumps({"load_s": load_s, "prefill_s": prefill[1], "prefill_first_s": prefill[0],
                      "decode_tok_s": steps / decode_s, "peak_rss_mb": rss_mb, "max_abs_diff": diff,
                      "torch_threads": torch.get_num_threads(), "attention": attn}))


if __name__ == "__main__":
    main()
