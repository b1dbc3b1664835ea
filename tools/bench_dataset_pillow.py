#!/usr/bin/env python3
"""Reference for `cargo bench -p inspector-dataset --bench dataset`: the same work in Python
with Pillow, on the same files, in the same run.

  validate  ANNOTATIONS OUT RULES INSTRUCTION
                              read the JSONL, check fields, read + sha256 + fully decode each
                              image (EXIF transposed), check boxes against its size, look the
                              citation up in RULES (a JSON list of citations), and write the
                              {"messages", "images"} conversations (INSTRUCTION is a file
                              holding the instruction) with 0-1000 boxes to OUT. A set lookup
                              stands in for citation resolution, so the reference does less
                              work than the real thing.
  augment   LIST OUTDIR       for each image path in LIST (one per line): flip, rotate 10 deg
                              (bilinear, expanded canvas), crop to 80 %, brightness 1.2,
                              contrast 0.8, Gaussian blur 1.0, save as PNG (compress_level 1).

Prints one JSON line: {"items", "seconds"}; interpreter start-up and imports excluded.
Needs Pillow.
"""
import hashlib
import io
import json
import os
import sys
import time

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

def validate(annotations, out, rules, instruction):
    base = os.path.dirname(annotations)
    known = set(json.load(open(rules, encoding="utf-8")))
    start = time.perf_counter()
    samples, errors, n = [], 0, 0
    with open(annotations, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            n += 1
            rec = json.loads(line)
            path = os.path.join(base, rec["image"])
            data = open(path, "rb").read()
            hashlib.sha256(data).hexdigest()
            img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
            img = img.convert("RGB")
            w, h = img.size
            answer = []
            for v in rec["violations"]:
                if not v["description"].strip() or v["rule"] not in known:
                    errors += 1
                b = v.get("box")
                item = {"description": v["description"], "rule": v["rule"], "risk": v["risk"]}
                if b is not None:
                    if not (0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h):
                        errors += 1
                    item["box"] = [round(b[0] / w * 1000), round(b[1] / h * 1000),
                                   round(b[2] / w * 1000), round(b[3] / h * 1000)]
                answer.append(item)
            status = "violation" if answer else "safe"
            samples.append(json.dumps({
                "messages": [
                    {"role": "user", "content": "<image>" + instruction},
                    {"role": "assistant", "content": json.dumps(
                        {"status": status, "violations": answer}, ensure_ascii=False,
                        separators=(",", ":"))},
                ],
                "images": [os.path.relpath(path, os.path.dirname(out))],
            }, ensure_ascii=False, separators=(",", ":")))
    with open(out, "w", encoding="utf-8") as fh:
        fh.write("\n".join(samples) + "\n")
    return n, time.perf_counter() - start


def augment(listing, outdir):
    paths = [p for p in open(listing).read().splitlines() if p]
    os.makedirs(outdir, exist_ok=True)
    start = time.perf_counter()
    for i, path in enumerate(paths):
        img = Image.open(path).convert("RGB")
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = img.rotate(-10, resample=Image.Resampling.BILINEAR, expand=True)
        w, h = img.size
        img = img.crop((w // 10, h // 10, w // 10 + w * 8 // 10, h // 10 + h * 8 // 10))
        img = ImageEnhance.Brightness(img).enhance(1.2)
        img = ImageEnhance.Contrast(img).enhance(0.8)
        img = img.filter(ImageFilter.GaussianBlur(1.0))
        img.save(os.path.join(outdir, f"{i}.png"), compress_level=1)
    return len(paths), time.perf_counter() - start


def main():
    mode = sys.argv[1]
    if mode == "validate":
        n, s = validate(sys.argv[2], sys.argv[3], sys.argv[4],
                        open(sys.argv[5], encoding="utf-8").read())
    elif mode == "augment":
        n, s = augment(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps({"items": n, "seconds": s}))


if __name__ == "__main__":
    main()
