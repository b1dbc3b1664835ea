#!/usr/bin/env python3
"""The transformers + PEFT side of `cargo bench -p inspector-detect --bench detect`.

Loads the tiny checkpoint with the overfitted LoRA adapter (PEFT, unmerged, as ours runs it),
takes the very prompts and pixel values our side ran (written by the bench), and generates
greedily up to <|im_end|> (at most 512 new tokens) in left-padded batches of 1, 4 and 8.
Prints one JSON line: photos/s per batch size, the decoded answers of the batch-1 run, and
versions.

Pinned: torch 2.15.0, transformers 5.24.0, peft 0.21.2; fp32; default thread count and
attention (sdpa).
Usage: python tools/bench_detect_transformers.py MODEL_DIR ADAPTER_DIR INPUTS.safetensors N
"""
import json
import sys
import time

import peft
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration


def main() -> None:
    model_dir, adapter_dir, inputs_path, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    cfg = model.base_model.model.config
    pad = getattr(cfg.get_text_config(), "pad_token_id", None)
    pad = pad if pad is not None else im_end
    t = load_file(inputs_path)
    ids = [t[f"ids.{i}"] for i in range(n)]
    pixels = [t[f"pixels.{i}"] for i in range(n)]
    grids = [t[f"grid.{i}"] for i in range(n)]

    def run(batch: int) -> tuple[float, list[str]]:
        texts = []
        start = time.perf_counter()
        for s in range(0, n, batch):
            rows = list(range(s, min(s + batch, n)))
            width = max(ids[r].shape[0] for r in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                length = ids[r].shape[0]
                input_ids[j, width - length:] = ids[r]
                mask[j, width - length:] = 1
            model.base_model.model.model.rope_deltas = None
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids, attention_mask=mask,
                    pixel_values=torch.cat([pixels[r] for r in rows]),
                    image_grid_thw=torch.stack([grids[r] for r in rows]),
                    mm_token_type_ids=(input_ids == cfg.image_token_id).long(),
                    max_new_tokens=512, do_sample=False, eos_token_id=im_end, pad_token_id=pad)
            for j in range(len(rows)):
                texts.append(tok.decode(out[j, width:], skip_special_tokens=True))
        return n / (time.perf_counter() - start), texts

    run(2)  # warm-up
    speeds, answers = [], None
    for batch in (1, 4, 8):
        speed, texts = run(batch)
        speeds.append(speed)
        if answers is None:
            answers = texts
    print(json.dumps({"photos_per_s": speeds, "answers": answers, "torch": torch.__version__,
                      "transformers": transformers.__version__, "peft": peft.__version__,
                      "threads": torch.get_num_threads()}, ensure_ascii=False))


if __name__ == "__main__":
    main()
