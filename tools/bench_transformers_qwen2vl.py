#!/usr/bin/env python3
"""The transformers side of `cargo bench -p inspector-qwen2vl --bench real_size`.

Loads the random-weight checkpoint the bench generated, runs the very inputs our side ran
(written by the bench to bench_inputs.safetensors), and prints one JSON line: load, prefill (the
second of two runs) and greedy decode speed with the KV cache, peak RSS, and the largest
difference between its last-position logits and ours.

Pinned: torch 2.15.0, transformers 5.24.0, fp32, eager attention, default thread count.
Usage: python tools/bench_transformers_qwen2vl.py MODEL_DIR INPUTS.safetensors DECODE_STEPS
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
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    load_s = time.perf_counter() - t
    inputs = load_file(inputs_path)
    ids = inputs["input_ids"]
    image_pad = model.config.image_token_id
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
              image_grid_thw=inputs["image_grid_thw"], mm_token_type_ids=(ids == image_pad).long())
    prefill = []
    with torch.no_grad():
        for _ in range(2):
            model.model.rope_deltas = None
            t = time.perf_counter()
            out = model(**kw, use_cache=True)
            prefill.append(time.perf_counter() - t)
        logits = out.logits[0, -1]
        diff = (logits - inputs["last_logits"].reshape(-1)).abs().max().item()
        cache = out.past_key_values
        token = logits.argmax().view(1, 1)
        mask = kw["attention_mask"]
        t = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
            out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = out.logits[0, -1].argmax().view(1, 1)
        decode_s = time.perf_counter() - t
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"load_s": load_s, "prefill_s": prefill[1], "prefill_first_s": prefill[0],
                      "decode_tok_s": steps / decode_s, "peak_rss_mb": rss_mb, "max_abs_diff": diff,
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
