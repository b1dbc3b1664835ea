#!/usr/bin/env python3
"""How far transformers' own bf16 forward is from its f32 forward on the tiny fixtures.

The Rust test `bf16_relative_error` (crates/qwen2vl/tests/parity.rs) bounds our bf16 logits'
relative error (max |Δ| / max |ref| over unpadded positions) against the f32 reference. This
script measures the same quantity for transformers itself, and for transformers with bf16-rounded
weights but f32 arithmetic (the error that weight rounding alone causes), so the bound can be
judged. Output is committed as crates/qwen2vl/tests/fixtures/bf16_reference_error.txt.

Pinned: torch 2.15.0, transformers 5.24.0. Run from the repo root:
    /path/to/venv/bin/python tools/qwen2vl_bf16_reference_error.py
"""
import torch
from safetensors.torch import load_file
from transformers import Qwen2VLForConditionalGeneration

ROOT = "crates/qwen2vl/tests/fixtures"
CASES = ["text_only", "one_square", "wide", "two_images", "batch_left_pad"]

print("model case transformers_bf16 bf16_weights_f32_math")
for m in ["tiny-a", "tiny-b", "tiny-c"]:
    bf16 = Qwen2VLForConditionalGeneration.from_pretrained(
        f"{ROOT}/{m}", dtype=torch.bfloat16, attn_implementation="eager").eval()
    rounded = Qwen2VLForConditionalGeneration.from_pretrained(
        f"{ROOT}/{m}", dtype=torch.bfloat16, attn_implementation="eager").eval().float()
    for case in CASES:
        r = load_file(f"{ROOT}/{m}/reference/{case}.safetensors")
        out = []
        for model, dtype in [(bf16, torch.bfloat16), (rounded, torch.float32)]:
            kw = dict(input_ids=r["input_ids"], attention_mask=r["attention_mask"])
            if "pixel_values" in r:
                kw.update(pixel_values=r["pixel_values"].to(dtype), image_grid_thw=r["image_grid_thw"],
                          mm_token_type_ids=r["mm_token_type_ids"])
            with torch.no_grad():
                logits = model(**kw).logits.float()
            mask = r["attention_mask"].bool()
            out.append(((logits - r["logits"]).abs()[mask].max() / r["logits"].abs().max()).item())
        print(f"{m} {case} {out[0]:.4f} {out[1]:.4f}")
