#!/usr/bin/env python3
"""The transformers (+ PEFT) side of the GPU benchmark (`crates/cli/benches/gpu.rs`).

Reads the checkpoint and the very inputs our side used (`inputs.safetensors`: input_ids,
pixel_values, image_grid_thw) and measures, on the same device and dtype, with eager attention
(the issue's reference) and no CUDA graphs:
- prefill: one forward over the prompt (median of 3 after a warm-up);
- decode tokens/s at batch 1 and 8: greedy `generate()` of N new tokens (min_new_tokens = N),
  less one prefill;
- LoRA training: PEFT r 16, alpha 32, no dropout, the language model's seven projections, f32
  LoRA weights (PEFT's autocast_adapter_dtype) over base weights in the dtype, AdamW lr 1e-4,
  the last 32 prompt tokens as labels; tokens/s over STEPS steps after a warm-up, and
  torch.cuda.max_memory_allocated.
Writes one JSON object to OUT.

Usage: python tools/gpu/bench_transformers.py MODEL_DIR INPUTS OUT [--device cuda]
           [--dtype bf16] [--new-tokens 64] [--train-steps 6]
"""
import argparse
import json
import time

import peft
import torch
import transformers
from safetensors.torch import load_file
from transformers import Qwen2VLForConditionalGeneration

TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("inputs")
    p.add_argument("out")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=DTYPES)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=6)
    a = p.parse_args()
    dev, dtype, n = a.device, DTYPES[a.dtype], a.new_tokens
    torch.backends.cuda.matmul.allow_tf32 = False

    inputs = load_file(a.inputs)
    ids = inputs["input_ids"].view(1, -1).to(dev)
    pixels = inputs["pixel_values"].to(dev, dtype)
    grid = inputs["image_grid_thw"].to(dev)

    model = Qwen2VLForConditionalGeneration.from_pretrained(
        a.model, dtype=dtype, attn_implementation="eager").to(dev).eval()
    image_pad = model.config.image_token_id

    def batch(b: int) -> dict:
        rows = ids.repeat(b, 1)
        return dict(input_ids=rows, attention_mask=torch.ones_like(rows),
                    pixel_values=pixels.repeat(b, 1), image_grid_thw=grid.repeat(b, 1),
                    mm_token_type_ids=(rows == image_pad).long())

    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, temperature=None, top_p=None,
              top_k=None, repetition_penalty=None, eos_token_id=None)
    out = {}
    with torch.no_grad():
        model(**batch(1))  # warm-up: kernel loading
        times = []
        for _ in range(3):
            sync(dev)
            t = time.perf_counter()
            model(**batch(1))
            sync(dev)
            times.append(time.perf_counter() - t)
        out["prefill_s"] = sorted(times)[1]
        for b in (1, 8):
            model.generate(**batch(b), **dict(kw, max_new_tokens=2, min_new_tokens=2))
            sync(dev)
            t = time.perf_counter()
            model(**batch(b))
            sync(dev)
            prefill_b = time.perf_counter() - t
            t = time.perf_counter()
            g = model.generate(**batch(b), **kw)
            sync(dev)
            total = time.perf_counter() - t
            assert g.shape[1] == ids.shape[1] + n
            # The first new token comes from the prefill; n - 1 decode steps follow.
            out[f"decode_b{b}_tok_s"] = b * (n - 1) / max(total - prefill_b, 1e-9)
    del model
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        a.model, dtype=dtype, attn_implementation="eager").to(dev)
    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
    model = peft.get_peft_model(model, config)
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()
    model.train()
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    labels = ids.clone()
    labels[:, : ids.shape[1] - 32] = -100
    b = dict(batch(1), labels=labels)
    losses = []

    def step() -> None:
        model.base_model.model.model.rope_deltas = None
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))

    step()
    sync(dev)
    t = time.perf_counter()
    for _ in range(a.train_steps):
        step()
    sync(dev)
    out["train_tok_s"] = a.train_steps * ids.shape[1] / (time.perf_counter() - t)
    out["train_losses"] = losses
    if dev.startswith("cuda"):
        out["train_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu"] = torch.cuda.get_device_name()
    out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                       "peft": peft.__version__, "attention": "eager"}
    with open(a.out, "w") as f:
        json.dump(out, f)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
