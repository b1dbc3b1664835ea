#!/usr/bin/env python3
"""The PyTorch + PEFT side of `cargo bench -p inspector-train --bench train`.

Loads the small random-weight Qwen2-VL the bench generated, puts a PEFT LoRA on it with the
bench's recipe (r 16, alpha 32, dropout 0.1, the language model's q/k/v/o/gate/up/down
projections; vision frozen), and trains on the very samples our side trained on (written by
the bench): batches of 2 taken in order, one warm-up step, then STEPS timed steps of forward,
backward, clipping at 1.0 and torch.optim.AdamW (lr 1e-4, weight decay 0.01). Prints one JSON
line: tokens/s (every position of every sample), peak RSS, versions, threads.

Pinned: torch 2.15.0, transformers 5.24.0, peft 0.21.2; fp32; torch's default thread count
(the machine's cores) and transformers' default attention (sdpa).
Usage: python tools/bench_train_peft.py MODEL_DIR INPUTS.safetensors STEPS
"""
import json
import sys
import time

import peft
import torch
import transformers
from safetensors.torch import load_file
from transformers import Qwen2VLForConditionalGeneration

TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def main() -> None:
    model_dir, inputs_path, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules=TARGETS)
    model = peft.get_peft_model(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)

    inputs = load_file(inputs_path)
    ids, labels, pixels, grid = (inputs["input_ids"], inputs["labels"], inputs["pixel_values"],
                                 inputs["image_grid_thw"])
    n = ids.shape[0]
    patches = (grid.prod(dim=1)).tolist()
    offsets = [0]
    for p in patches:
        offsets.append(offsets[-1] + p)
    image_pad = model.config.image_token_id

    def batch(k: int) -> dict:
        rows = [(2 * k + j) % n for j in range(2)]
        b_ids = ids[rows]
        return dict(
            input_ids=b_ids,
            attention_mask=torch.ones_like(b_ids),
            labels=labels[rows],
            pixel_values=torch.cat([pixels[offsets[r]:offsets[r + 1]] for r in rows]),
            image_grid_thw=grid[rows],
            mm_token_type_ids=(b_ids == image_pad).long(),
        )

    def step(k: int) -> int:
        b = batch(k)
        model.base_model.model.model.rope_deltas = None
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(b["input_ids"].numel())

    step(0)
    tokens = 0
    t = time.perf_counter()
    for k in range(1, steps + 1):
        tokens += step(k)
    seconds = time.perf_counter() - t
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so a child started by the
    # bench would report the bench's own peak.
    with open("/proc/self/status") as f:
        rss_mb = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    print(json.dumps({
        "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "peak_rss_mb": rss_mb, "trainable_params": sum(p.numel() for p in trainable),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
