#!/usr/bin/env python3
"""The transformers side of `cargo bench -p inspector-qwen2vl --bench decode`.

Greedy `generate()` of N new tokens (no early stop) after the given prompt on the tiny fixture,
timed less one prefill, and the time of one cached decode step at 256, 1024 and 4096 tokens of
context. Prints one JSON line. Pinned: torch 2.15.0, transformers 5.24.0, fp32, default
(sdpa) attention, default thread count.

Usage: python tools/bench_transformers_decode.py MODEL_DIR IDS(comma-separated) N STEPS
"""
import json
import sys
import time

import torch
from transformers import Qwen2VLForConditionalGeneration


def main() -> None:
    model_dir, ids, n, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = torch.tensor([[int(t) for t in ids.split(",")]])
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, temperature=None, top_p=None,
              top_k=None, repetition_penalty=None, eos_token_id=None)
    with torch.no_grad():
        model.generate(prompt, **kw)  # warm-up
        t = time.perf_counter()
        model(prompt)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(prompt, **kw)
        total = time.perf_counter() - t
        assert out.shape[1] == prompt.shape[1] + n
        step_ms = []
        for ctx in (256, 1024, 4096):
            ids = (torch.arange(ctx - steps) * 7 % 280).view(1, -1)
            o = model(ids, use_cache=True)
            cache = o.past_key_values
            token = torch.tensor([[5]])
            t = time.perf_counter()
            for _ in range(steps):
                o = model(token, past_key_values=cache, use_cache=True)
                cache = o.past_key_values
            step_ms.append((time.perf_counter() - t) * 1000 / steps)
    print(json.dumps({"decode_tok_s": (n - 1) / (total - prefill), "step_ms": step_ms,
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
