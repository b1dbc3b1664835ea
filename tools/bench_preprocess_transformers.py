#!/usr/bin/env python3
"""Reference for `cargo bench -p inspector-qwen2vl --bench preprocess`: transformers' Qwen2-VL
image processors on the same photos, in the same run.

  bench_preprocess_transformers.py MIN_PIXELS MAX_PIXELS ROUNDS PHOTO...

For each round, every photo is opened and decoded as transformers' `load_image` does (PIL,
EXIF transposed, RGB) and turned into `pixel_values` by the PIL processor ("slow") and by the
torchvision one ("fast"), one photo per call as a training data loader does. Prints one JSON
line: {"photos", "slow_seconds", "fast_seconds"} (the best round of each); interpreter
start-up and imports excluded. Needs torch, torchvision and transformers.
"""
import json
import sys
import time

import torch
from PIL import Image, ImageOps
from transformers import Qwen2VLImageProcessor, Qwen2VLImageProcessorFast


def load(path):
    image = Image.open(path)
    image = ImageOps.exif_transpose(image)
    return image.convert("RGB")


def main():
    min_pixels, max_pixels, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    photos = sys.argv[4:]
    torch.set_num_threads(2)
    kwargs = dict(min_pixels=min_pixels, max_pixels=max_pixels)
    best = {}
    for name, cls in (("slow", Qwen2VLImageProcessor), ("fast", Qwen2VLImageProcessorFast)):
        processor = cls(**kwargs)
        processor(images=[load(photos[0])], return_tensors="pt")  # warm-up
        for _ in range(rounds):
            start = time.perf_counter()
            for p in photos:
                out = processor(images=[load(p)], return_tensors="pt")
                assert out["pixel_values"].shape[1] == 1176
            seconds = time.perf_counter() - start
            best[name] = min(best.get(name, seconds), seconds)
    print(json.dumps({"photos": len(photos), "slow_seconds": best["slow"], "fast_seconds": best["fast"]}))


if __name__ == "__main__":
    main()
