#!/usr/bin/env python3
"""Reference fixtures for LoRA training and PEFT interop (crates/train/tests/fixtures/peft/).

Mode ``make`` (default) writes, from the tiny random checkpoint ``tiny-a`` of
``crates/qwen2vl/tests/fixtures``:

  adapter/              a PEFT LoRA adapter (r 4, alpha 8, dropout 0, the language model's
                        q/k/v/o/gate/up/down projections) with init_lora_weights=False, so that
                        B is non-zero and every LoRA gradient is non-zero from the first step;
                        saved by PEFT's save_pretrained.
  batch.safetensors     a training batch of 2 rows, left-padded to one length, each with its own
                        image (different grids) -- input_ids, attention_mask, labels (-100 on the
                        prompt and the padding), pixel_values, image_grid_thw -- and PEFT's
                        results for it: ``loss`` (transformers' causal-LM loss, the mean over
                        answer tokens), ``logits`` [2, S, V] and, for every LoRA tensor,
                        ``grad.<adapter key>`` after one backward pass.
  meta.json             versions and settings.

Mode ``check-ours DIR`` loads ``DIR/adapter`` -- an adapter trained by inspector -- into PEFT on
tiny-a, reports missing and unexpected keys, computes the logits on batch.safetensors and
compares them with ``DIR/our_logits.safetensors`` (written by inspector); writes
``DIR/peft_check.json``, which is committed and asserted by a Rust test.

Mode ``check-merged DIR`` loads ``DIR/merged`` -- a model directory written by
``inspector adapter merge`` -- with transformers, reports missing and unexpected keys, and
compares its logits on batch.safetensors with ``DIR/our_logits.safetensors``; writes
``DIR/merged_check.json``.

Mode ``full`` writes ``crates/train/tests/fixtures/full/grads.safetensors``: the base model
(no adapter, every weight trainable, as ``inspector train --full`` trains it) on
batch.safetensors, its loss and the gradient of every weight after one backward pass, under
the checkpoint's own names (``visual.…``, ``model.…``, ``lm_head.…``). It checks the vision
tower's and merger's backward passes end to end, which the LoRA fixture (language model only)
does not reach.

Float32, CPU, one thread, eager attention: two runs give identical bytes.

    /work/venv/bin/python tools/make_lora_fixtures.py
    /work/venv/bin/python tools/make_lora_fixtures.py check-ours crates/train/tests/fixtures/overfit
    /work/venv/bin/python tools/make_lora_fixtures.py check-merged crates/train/tests/fixtures/overfit
    /work/venv/bin/python tools/make_lora_fixtures.py full
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import peft  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import Qwen2VLForConditionalGeneration  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "crates/qwen2vl/tests/fixtures/tiny-a"
OUT = ROOT / "crates/train/tests/fixtures/peft"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IMAGE, V_START, V_END, PAD = 300, 302, 303, 305

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


def load_base():
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        BASE, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


def make_batch():
    rng = np.random.RandomState(7)
    proc = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 16)
    images = [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for (w, h) in [(56, 56), (84, 56)]]
    rows, labels, pix, grids = [], [], [], []
    for k, img in enumerate(images):
        out = proc(images=[img], return_tensors="pt")
        grid = out["image_grid_thw"][0]
        n = int(grid.prod()) // 4
        prompt = list(rng.randint(0, 290, 5 + 3 * k)) + [V_START] + [IMAGE] * n + [V_END] + list(rng.randint(0, 290, 4))
        answer = list(rng.randint(0, 290, 9 - 2 * k)) + [304]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
        pix.append(out["pixel_values"])
        grids.append(grid)
    s = max(len(r) for r in rows)
    ids = torch.full((2, s), PAD, dtype=torch.long)
    att = torch.zeros((2, s), dtype=torch.long)
    lab = torch.full((2, s), -100, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, s - len(r):] = torch.tensor(r)
        att[i, s - len(r):] = 1
        lab[i, s - len(l):] = torch.tensor(l)
    return dict(input_ids=ids, attention_mask=att, labels=lab,
                pixel_values=torch.cat(pix).float(), image_grid_thw=torch.stack(grids))


def forward(model, b, labels=True):
    kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
              pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
              mm_token_type_ids=(b["input_ids"] == IMAGE).long())
    if labels:
        kw["labels"] = b["labels"]
    return model(**kw)


def make():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1234)
    model = load_base()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                          init_lora_weights=False, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
    model.eval()  # dropout is 0 anyway; eval keeps every other module deterministic
    b = make_batch()
    out = forward(model, b)
    out.loss.backward()
    model.save_pretrained(OUT / "adapter")
    tensors = {k: v.contiguous() for k, v in b.items()}
    tensors["loss"] = out.loss.detach().reshape(1)
    tensors["logits"] = out.logits.detach().float().contiguous()
    grads = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = name.replace(".default", "")
            tensors["grad." + key] = p.grad.detach().contiguous()
            grads += 1
    safetensors.torch.save_file(tensors, OUT / "batch.safetensors")
    meta = dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                base="crates/qwen2vl/tests/fixtures/tiny-a", r=4, lora_alpha=8, targets=TARGETS,
                loss=float(out.loss), lora_tensors=grads)
    (OUT / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta))


def check_ours(d: Path):
    model = load_base()
    model = peft.PeftModel.from_pretrained(model, d / "adapter")
    model.eval()
    # What PEFT did with the file: every key must have been used, every LoRA module filled.
    state = safetensors.torch.load_file(d / "adapter" / "adapter_model.safetensors")
    lora_params = {n.replace(".default", "") for n, _ in model.named_parameters() if "lora_" in n}
    file_keys = set(state)
    missing = sorted(lora_params - file_keys)
    unexpected = sorted(file_keys - lora_params)
    b = {k: v for k, v in safetensors.torch.load_file(OUT / "batch.safetensors").items()}
    with torch.no_grad():
        logits = forward(model, b, labels=False).logits.float()
    ours = safetensors.torch.load_file(d / "our_logits.safetensors")["logits"]
    mask = b["attention_mask"].bool()
    diff = (logits - ours)[mask].abs().max().item()
    ref = logits[mask].abs().max().item()
    result = dict(missing_keys=missing, unexpected_keys=unexpected, lora_tensors=len(lora_params),
                  max_abs_diff=diff, max_abs_logit=ref, peft=peft.__version__,
                  transformers=transformers.__version__)
    (d / "peft_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def check_merged(d: Path):
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(
        d / "merged", torch_dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    model.eval()
    b = {k: v for k, v in safetensors.torch.load_file(OUT / "batch.safetensors").items()}
    with torch.no_grad():
        logits = forward(model, b, labels=False).logits.float()
    ours = safetensors.torch.load_file(d / "our_logits.safetensors")["logits"]
    mask = b["attention_mask"].bool()
    result = dict(missing_keys=sorted(info["missing_keys"]), unexpected_keys=sorted(info["unexpected_keys"]),
                  max_abs_diff=(logits - ours)[mask].abs().max().item(),
                  max_abs_logit=logits[mask].abs().max().item(), transformers=transformers.__version__)
    (d / "merged_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def checkpoint_name(name: str) -> str:
    """transformers' parameter name -> tiny-a's checkpoint key (the pre-4.52 layout)."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def make_full():
    out = ROOT / "crates/train/tests/fixtures/full"
    out.mkdir(parents=True, exist_ok=True)
    model = load_base()
    for p in model.parameters():
        p.requires_grad_(True)
    b = {k: v for k, v in safetensors.torch.load_file(OUT / "batch.safetensors").items()}
    loss = forward(model, b).loss
    loss.backward()
    tensors = {"loss": loss.detach().reshape(1)}
    for name, p in model.named_parameters():
        tensors["grad." + checkpoint_name(name)] = p.grad.detach().contiguous()
    safetensors.torch.save_file(tensors, out / "grads.safetensors")
    meta = dict(torch=torch.__version__, transformers=transformers.__version__,
                base="crates/qwen2vl/tests/fixtures/tiny-a", loss=float(loss),
                tensors=len(tensors) - 1)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "full":
        make_full()
    elif len(sys.argv) > 2 and sys.argv[1] == "check-ours":
        check_ours(Path(sys.argv[2]))
    elif len(sys.argv) > 2 and sys.argv[1] == "check-merged":
        check_merged(Path(sys.argv[2]))
    else:
        make()
