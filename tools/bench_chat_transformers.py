#!/usr/bin/env python3
"""The transformers side of `cargo bench -p inspector-cli --bench cpu_inference`.

One whole process, as a user runs it: load the model directory (fp32, sdpa attention), read the
photo, render the chat template with AutoProcessor, generate exactly N greedy tokens
(`min_new_tokens` = `max_new_tokens` = N), print the answer. Prints one JSON line with the
phases (load, prefill = up to the first new token, decode tokens/s over the other N - 1 tokens)
besides the answer; the bench times the process from the outside.

Pinned: torch 2.15.0, transformers 5.24.0, the thread count from the first argument.
Usage: python tools/bench_chat_transformers.py THREADS MODEL_DIR IMAGE PROMPT N
"""
import json
import sys
import time

t_start = time.perf_counter()

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration  # noqa: E402

t_imported = time.perf_counter()


class Clock:
    """A streamer that records when each new token arrives (the first `put` is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def main() -> None:
    threads, model_dir, image, prompt, n = sys.argv[1:6]
    torch.set_num_threads(int(threads))
    n = int(n)
    t = time.perf_counter()
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(model_dir, max_pixels=448 * 448)
    load_s = time.perf_counter() - t
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(image).convert("RGB")], return_tensors="pt")
    clock = Clock()
    with torch.no_grad():
        t = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             streamer=clock)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert len(new) == n, len(new)
    # times[0]: the prompt; times[1]: the first new token; times[n]: the last.
    prefill_s = clock.times[1] - t
    decode_s = clock.times[n] - clock.times[1]
    answer = processor.decode(new, skip_special_tokens=True)
    with open("/proc/self/status") as f:
        rss_mb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    print(json.dumps({
        "answer": answer, "prompt_tokens": int(inputs["input_ids"].shape[1]), "new_tokens": n,
        "import_s": t_imported - t_start,
        "load_s": load_s, "prefill_s": prefill_s, "decode_tokens_per_s": (n - 1) / decode_s,
        "peak_rss_mb": rss_mb, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }, ensure_ascii=False))


if __name__ == "__main__":
    main()
