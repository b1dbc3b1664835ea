#!/usr/bin/env python3
"""Generate tiny random-weight Qwen2-VL checkpoints and Hugging Face reference tensors.

Purpose
-------
The Rust crate `crates/qwen2vl` re-implements Qwen2-VL on candle.  This script
produces everything its parity tests compare against:

* three tiny checkpoints (``tiny-a``, ``tiny-b``, ``tiny-c``) that together cover
  the config layouts (hub "flat" vs transformers-5 "nested"), the weight-key
  layouts (hub "legacy" ``model.layers.*``/``visual.*`` vs transformers-5
  ``model.language_model.*``/``model.visual.*``), single-file vs sharded
  safetensors, tied vs untied embeddings, GQA ratios, mrope sections, rope
  thetas and special-token ids;
* per model, reference tensors (``<model>/reference/<case>.safetensors``):
  inputs, M-RoPE position ids, rope deltas, vision-tower output and float32
  logits from ``Qwen2VLForConditionalGeneration`` (eager attention);
* real photographs (from scikit-image) in several PIL modes and the
  pixel_values that both transformers image processors (torchvision "fast"
  and PIL "slow") produce for them (``images/`` and ``images/reference/``).

Everything is written under ``crates/qwen2vl/tests/fixtures/`` (≤ 12 MB).
The script is deterministic (fixed seeds, CPU, float32).

Pinned versions (the script refuses to run with others unless
``--allow-other-versions`` is given):

    torch          2.15.0
    transformers   5.24.0
    torchvision    0.29.2
    scikit-image   0.26.0
    safetensors, pillow, numpy: whatever the above pulled in (recorded in meta.json)

Run from the repository root:

    /path/to/venv/bin/python tools/make_qwen2vl_fixtures.py

(on the original machine: ``/work/venv/bin/python tools/make_qwen2vl_fixtures.py``).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import transformers
import torchvision
import skimage
import skimage.data
import safetensors
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.image_utils import load_image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

PINNED = {
    "torch": "2.15.0",
    "transformers": "5.24.0",
    "torchvision": "0.29.2",
    "scikit-image": "0.26.0",
}

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "crates" / "qwen2vl" / "tests" / "fixtures"
SIZE_LIMIT = 12 * 1024 * 1024

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Vision tower shared by all three models (vision `hidden_size` = LLM hidden size).
VISION = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, patch_size=14, temporal_patch_size=2,
              spatial_merge_size=2, in_channels=3, hidden_act="quick_gelu")

MODELS = {
    # Hub flat config, legacy keys, single model.safetensors, untied lm_head.
    "tiny-a": dict(
        seed=1001, vocab=320, hidden=64, heads=4, kv_heads=2, intermediate=128, mrope=[2, 3, 3],
        rope_theta=1_000_000.0, tied=False, config_layout="flat", key_layout="legacy", shards=1,
        ids=dict(image=300, video=301, vision_start=302, vision_end=303, eos=304, pad=305, bos=306,
                 vision_pad=307),
    ),
    # transformers-5 nested config + new keys via save_pretrained, sharded, tied, GQA 4.
    "tiny-b": dict(
        seed=2002, vocab=336, hidden=128, heads=4, kv_heads=1, intermediate=256, mrope=[4, 6, 6],
        rope_theta=1_000_000.0, tied=True, config_layout="nested", key_layout="new", shards="auto",
        ids=dict(image=310, video=311, vision_start=308, vision_end=309, eos=312, pad=313, bos=307),
    ),
    # Hub flat config, legacy keys, 2 hand-written shards + index, tied, theta 1e4.
    "tiny-c": dict(
        seed=3003, vocab=312, hidden=48, heads=6, kv_heads=3, intermediate=96, mrope=[1, 1, 2],
        rope_theta=10_000.0, tied=True, config_layout="flat", key_layout="legacy", shards=2,
        ids=dict(image=296, video=297, vision_start=298, vision_end=299, eos=300, pad=301, bos=302,
                 vision_pad=303),
    ),
}
TEXT_ID_MAX = 290  # ordinary text tokens are drawn from [0, 290): never a special id in any model
MIN_PIXELS = 3136
MAX_PIXELS_MODELS = 12544 * 4
MAX_PIXELS_IMAGES = 12544


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def check_versions(allow_other: bool) -> dict:
    found = {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "torchvision": torchvision.__version__.split("+")[0],
        "scikit-image": skimage.__version__,
    }
    bad = {k: (v, PINNED[k]) for k, v in found.items() if v != PINNED[k]}
    if bad and not allow_other:
        sys.exit(f"version mismatch (found, pinned): {bad}; pass --allow-other-versions to ignore")
    found.update({"numpy": np.__version__, "pillow": PIL.__version__, "safetensors": safetensors.__version__,
                  "python": sys.version.split()[0]})
    return found


def hf_config(spec: dict) -> Qwen2VLConfig:
    ids = spec["ids"]
    text = dict(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
        num_hidden_layers=2, num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
        hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-6, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": spec["rope_theta"], "mrope_section": spec["mrope"]},
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
    )
    vision = dict(VISION, hidden_size=spec["hidden"])
    cfg = Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["image"], video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=spec["tied"],
    )
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    return cfg


def flat_config_json(spec: dict) -> dict:
    """config.json in the layout of Qwen/Qwen2-VL-2B-Instruct on the hub (transformers 4.41-era)."""
    ids = spec["ids"]
    vision = {
        "depth": VISION["depth"],
        "embed_dim": VISION["embed_dim"],
        "mlp_ratio": VISION["mlp_ratio"],
        "num_heads": VISION["num_heads"],
        "in_chans": VISION["in_channels"],  # hub spelling; transformers ignores it and defaults in_channels=3
        "hidden_size": spec["hidden"],
        "patch_size": VISION["patch_size"],
        "spatial_merge_size": VISION["spatial_merge_size"],
        "spatial_patch_size": VISION["patch_size"],
        "temporal_patch_size": VISION["temporal_patch_size"],
        "hidden_act": VISION["hidden_act"],
    }
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "vision_start_token_id": ids["vision_start"],
        "vision_end_token_id": ids["vision_end"],
        "vision_token_id": ids["vision_pad"],  # present on the hub (<|vision_pad|>), unused by transformers
        "image_token_id": ids["image"],
        "video_token_id": ids["video"],
        "hidden_act": "silu",
        "hidden_size": spec["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": spec["intermediate"],
        "max_position_embeddings": 4096,
        "max_window_layers": 2,
        "model_type": "qwen2_vl",
        "num_attention_heads": spec["heads"],
        "num_hidden_layers": 2,
        "num_key_value_heads": spec["kv_heads"],
        "rms_norm_eps": 1e-06,
        "rope_theta": spec["rope_theta"],
        "sliding_window": 4096,
        "tie_word_embeddings": spec["tied"],
        "torch_dtype": "float32",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": vision,
        "rope_scaling": {"type": "mrope", "mrope_section": list(spec["mrope"])},
        "vocab_size": spec["vocab"],
    }


def hub_preprocessor_config(max_pixels: int) -> dict:
    """preprocessor_config.json in the hub form (Qwen/Qwen2-VL-2B-Instruct), smaller max_pixels."""
    return {
        "min_pixels": MIN_PIXELS,
        "max_pixels": max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
    }


def randomize_(model: torch.nn.Module, seed: int, tied: bool) -> None:
    """Re-randomise every parameter so that no tensor keeps its init value (ones, zeros, ...)."""
    g = torch.Generator().manual_seed(seed)
    norm_types = (torch.nn.LayerNorm,)
    seen = set()
    with torch.no_grad():
        for mod_name, mod in model.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                if id(p) in seen:  # tied lm_head: same tensor as embed_tokens, randomise once
                    continue
                seen.add(id(p))
                full = f"{mod_name}.{p_name}"
                is_norm = isinstance(mod, norm_types) or type(mod).__name__.endswith("RMSNorm")
                if is_norm and p_name == "weight":
                    val = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
                elif p_name == "bias":
                    val = 0.1 * torch.randn(p.shape, generator=g)
                elif "embed_tokens" in full:
                    # tied models reuse this as lm_head: scale so that logits stay O(1..10)
                    std = 2.5 / math.sqrt(p.shape[1]) if tied else 0.5
                    val = std * torch.randn(p.shape, generator=g)
                elif full.startswith("lm_head"):
                    val = 0.3 * torch.randn(p.shape, generator=g)
                elif "patch_embed" in full:
                    val = 0.03 * torch.randn(p.shape, generator=g)
                else:
                    val = 0.1 * torch.randn(p.shape, generator=g)
                p.copy_(val)


def unique_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied tensors


def new_to_legacy(key: str) -> str:
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return "visual." + key[len("model.visual."):]
    if key.startswith("lm_head."):
        return key
    raise ValueError(f"unexpected key {key}")


def legacy_state_dict(model, tied: bool) -> dict:
    sd = {}
    for k, v in model.state_dict().items():
        if tied and k == "lm_head.weight":
            continue
        sd[new_to_legacy(k)] = v.detach().clone().contiguous()
    return sd


def make_tokenizer(spec: dict) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer: ordinary token i is spelled `w{i}`; Qwen-named special tokens at the model's ids."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    ids = spec["ids"]
    special = {
        ids["bos"]: "<|endoftext|>", ids["vision_start"]: "<|vision_start|>", ids["vision_end"]: "<|vision_end|>",
        ids["image"]: "<|image_pad|>", ids["video"]: "<|video_pad|>", ids["eos"]: "<|im_end|>", ids["pad"]: "<|pad|>",
    }
    vocab = {special.get(i, f"w{i}"): i for i in range(spec["vocab"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens([AddedToken(special[i], special=True, normalized=False) for i in sorted(special)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", unk_token="w0", padding_side="left")
    return fast


def noise_image(rng: np.random.RandomState, w: int, h: int) -> Image.Image:
    return Image.fromarray(rng.randint(0, 256, size=(h, w, 3), dtype=np.uint8))


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------

def build_model(name: str, spec: dict):
    torch.manual_seed(spec["seed"])
    cfg = hf_config(spec)
    model = Qwen2VLForConditionalGeneration(cfg).eval().float()
    randomize_(model, spec["seed"], spec["tied"])
    if spec["tied"]:
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    else:
        assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    return model


def write_checkpoint(name: str, spec: dict, model, out: Path) -> dict:
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    info = {}
    if spec["config_layout"] == "flat":
        (d / "config.json").write_text(json.dumps(flat_config_json(spec), indent=2) + "\n")
        (d / "preprocessor_config.json").write_text(
            json.dumps(hub_preprocessor_config(MAX_PIXELS_MODELS), indent=2) + "\n")
        sd = legacy_state_dict(model, spec["tied"])
        # cross-check our renaming against transformers' own reverse conversion (save_original_format=True)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, save_original_format=True)
            ref = load_file(os.path.join(tmp, "model.safetensors"))
            assert set(ref) == set(sd), (set(ref) ^ set(sd))
            for k in sd:
                assert torch.equal(ref[k], sd[k]), k
        keys = sorted(sd)
        if spec["shards"] == 1:
            save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
            info["weight_files"] = ["model.safetensors"]
        else:
            n = spec["shards"]
            chunks = np.array_split(np.array(keys, dtype=object), n)
            weight_map, total = {}, 0
            files = []
            for i, chunk in enumerate(chunks):
                fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                part = {k: sd[k] for k in chunk}
                save_file(part, d / fname, metadata={"format": "pt"})
                files.append(fname)
                for k in chunk:
                    weight_map[k] = fname
                    total += sd[k].numel() * sd[k].element_size()
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            info["weight_files"] = files
    else:
        # transformers-5 native layout: nested config, new keys (save_original_format=False), sharded
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        shard = int(nbytes * 0.6)
        model.save_pretrained(d, max_shard_size=shard, save_original_format=False)
        files = sorted(p.name for p in d.glob("model-*.safetensors"))
        assert len(files) >= 2, files
        info["weight_files"] = files
        proc = Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS_MODELS),
            tokenizer=make_tokenizer(spec),
            video_processor=Qwen2VLVideoProcessor(),
        )
        proc.save_pretrained(d)
    return info


def verify_reload(name: str, spec: dict, model, out: Path, sample: dict) -> None:
    d = out / name
    loaded, loading_info = Qwen2VLForConditionalGeneration.from_pretrained(
        d, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    loaded.eval()
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not loading_info.get(k), (name, k, loading_info.get(k))
    c1, c2 = model.config, loaded.config
    for attr in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                 "rms_norm_eps", "num_hidden_layers"):
        assert getattr(c1.text_config, attr) == getattr(c2.text_config, attr), (name, attr)
    assert c2.text_config.rope_parameters["mrope_section"] == spec["mrope"]
    assert c2.text_config.rope_parameters["rope_theta"] == spec["rope_theta"]
    assert c2.tie_word_embeddings == spec["tied"]
    for attr in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert getattr(c1, attr) == getattr(c2, attr), (name, attr)
    if spec["tied"]:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.language_model.embed_tokens.weight.data_ptr()
    sd1, sd2 = model.state_dict(), loaded.state_dict()
    assert set(sd1) == set(sd2)
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), (name, k)
    with torch.no_grad():
        l1 = model(**sample).logits
        l2 = loaded(**sample).logits
    assert torch.equal(l1, l2), (name, (l1 - l2).abs().max())


# --------------------------------------------------------------------------------------------
# reference cases
# --------------------------------------------------------------------------------------------

def case_layouts(rng: np.random.RandomState):
    """Each case: list of rows; a row is a list of items: ('text', [ids]) or ('image', (w, h))."""
    t = lambda n: ("text", rng.randint(0, TEXT_ID_MAX, size=n).tolist())  # noqa: E731
    return {
        "text_only": [[t(12)]],
        "one_square": [[t(3), ("image", (56, 56)), t(3)]],
        "wide": [[t(2), ("image", (224, 56)), t(4)]],
        "two_images": [[t(2), ("image", (56, 56)), t(3), ("image", (112, 84)), t(2)]],
        "batch_left_pad": [
            [t(3), ("image", (84, 56)), t(4)],
            [t(2), ("image", (56, 56)), t(2)],
        ],
    }


def build_case(rows, spec, image_processor, rng):
    ids = spec["ids"]
    images = []
    for row in rows:
        for kind, val in row:
            if kind == "image":
                images.append(noise_image(rng, *val))
    pix = None
    grids = None
    if images:
        bf = image_processor(images=images, return_tensors="pt")
        pix, grids = bf["pixel_values"], bf["image_grid_thw"]
    seqs, types, texts = [], [], []
    img_i = 0
    for row in rows:
        seq, typ, words = [], [], []
        for kind, val in row:
            if kind == "text":
                seq += val
                typ += [0] * len(val)
                words += [f"w{v}" for v in val]
            else:
                n = int(grids[img_i].prod()) // 4
                img_i += 1
                seq += [ids["vision_start"]] + [ids["image"]] * n + [ids["vision_end"]]
                typ += [0] + [1] * n + [0]
                words.append("<|vision_start|><|image_pad|><|vision_end|>")
        seqs.append(seq)
        types.append(typ)
        texts.append(" ".join(words))
    S = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, S), ids["pad"], dtype=torch.long)
    attn = torch.zeros((B, S), dtype=torch.long)
    mm = torch.zeros((B, S), dtype=torch.long)
    for b, (s, ty) in enumerate(zip(seqs, types)):
        input_ids[b, S - len(s):] = torch.tensor(s)
        attn[b, S - len(s):] = 1
        mm[b, S - len(s):] = torch.tensor(ty)
    return dict(input_ids=input_ids, attention_mask=attn, mm_token_type_ids=mm, pixel_values=pix,
                image_grid_thw=grids, images=images, texts=texts)


def run_reference(model, case):
    kw = dict(input_ids=case["input_ids"], attention_mask=case["attention_mask"])
    has_img = case["pixel_values"] is not None
    if has_img:
        kw.update(pixel_values=case["pixel_values"], image_grid_thw=case["image_grid_thw"],
                  mm_token_type_ids=case["mm_token_type_ids"])
    with torch.no_grad():
        model.model.rope_deltas = None
        out = model(**kw)
        logits = out.logits.float()
        B, S = case["input_ids"].shape
        if has_img:
            pos, deltas = model.model.get_rope_index(
                case["input_ids"], mm_token_type_ids=case["mm_token_type_ids"],
                image_grid_thw=case["image_grid_thw"], attention_mask=case["attention_mask"])
            assert torch.equal(deltas, model.model.rope_deltas), "forward used different rope deltas"
            feats = model.model.get_image_features(case["pixel_values"], case["image_grid_thw"])
            image_embeds = torch.cat(feats.pooler_output, dim=0).float()
            assert image_embeds.shape[0] == int((case["input_ids"] == model.config.image_token_id).sum())
        else:
            # text-only forward: the text model uses arange(S) on all three axes, rope delta 0
            pos = torch.arange(S).view(1, 1, S).expand(3, B, S).clone()
            deltas = torch.zeros((B, 1), dtype=torch.long)
            image_embeds = None
        # the explicit position ids must reproduce the forward bit-for-bit
        model.model.rope_deltas = None
        kw2 = dict(kw, position_ids=pos)
        logits2 = model(**kw2).logits
        assert torch.equal(logits, logits2), (logits - logits2).abs().max()
    assert torch.isfinite(logits).all()
    return pos.long().contiguous(), deltas.long().contiguous(), image_embeds, logits.contiguous()


def write_references(name: str, spec: dict, model, out: Path, versions: dict) -> dict:
    d = out / name
    ref_dir = d / "reference"
    ref_dir.mkdir(parents=True, exist_ok=True)
    ip = AutoImageProcessor.from_pretrained(d)  # the model dir's own processor, default (torchvision) backend
    assert type(ip).__name__ == "Qwen2VLImageProcessor", type(ip)
    full_proc = AutoProcessor.from_pretrained(d) if spec["config_layout"] == "nested" else None
    rng = np.random.RandomState(spec["seed"])
    layouts = case_layouts(rng)
    meta = {
        "model": name,
        "versions": versions,
        "dtype": "float32",
        "attn_implementation": "eager",
        "token_ids": spec["ids"],
        "text_token_range": [0, TEXT_ID_MAX],
        "processor": {"class": type(ip).__name__, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS_MODELS},
        "notes": [
            "input_ids already contain one image_pad per merged vision token (grid_t*grid_h*grid_w/4).",
            "images are uniform-noise RGB (numpy RandomState(seed).randint(0,256,(h,w,3))), sizes given as [w,h].",
            "batch rows are LEFT padded with the pad id; attention_mask=0 there. logits at padded positions are "
            "meaningless (every key is masked; eager softmax over all-min scores) -- compare only where "
            "attention_mask==1. position_ids are 0 at padded positions.",
            "text_only: no images; position_ids = arange(S) on all 3 axes, rope_deltas = 0 (what the forward uses).",
            "mm_token_type_ids (extra tensor) = 1 at image_pad positions, 0 elsewhere (incl. vision_start/end, pads).",
        ],
        "cases": {},
    }
    for case_name, rows in layouts.items():
        case = build_case(rows, spec, ip, rng)
        if full_proc is not None:
            # the full processor (tokenizer + image processor) must produce the same tensors
            kw = dict(text=case["texts"], return_tensors="pt", padding=True)
            if case["images"]:
                kw["images"] = case["images"]
            po = full_proc(**kw)
            assert torch.equal(po["input_ids"], case["input_ids"]), case_name
            assert torch.equal(po["attention_mask"], case["attention_mask"]), case_name
            assert torch.equal(po["mm_token_type_ids"].long(), case["mm_token_type_ids"]), case_name
            if case["images"]:
                assert torch.equal(po["pixel_values"], case["pixel_values"]), case_name
                assert torch.equal(po["image_grid_thw"], case["image_grid_thw"]), case_name
        pos, deltas, image_embeds, logits = run_reference(model, case)
        tensors = {
            "input_ids": case["input_ids"].long().contiguous(),
            "attention_mask": case["attention_mask"].long().contiguous(),
            "mm_token_type_ids": case["mm_token_type_ids"].long().contiguous(),
            "position_ids": pos,
            "rope_deltas": deltas,
            "logits": logits,
        }
        if case["pixel_values"] is not None:
            tensors["pixel_values"] = case["pixel_values"].float().contiguous()
            tensors["image_grid_thw"] = case["image_grid_thw"].long().contiguous()
            tensors["image_embeds"] = image_embeds.contiguous()
        for k, v in tensors.items():
            if v.dtype == torch.float32:
                assert torch.isfinite(v).all(), (name, case_name, k)
        save_file(tensors, ref_dir / f"{case_name}.safetensors", metadata={"format": "pt"})
        valid = case["attention_mask"].bool()
        lv = logits[valid]
        meta["cases"][case_name] = {
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
            "image_sizes_wh": [list(im.size) for im in case["images"]],
            "image_grid_thw": case["image_grid_thw"].tolist() if case["image_grid_thw"] is not None else [],
            "rope_deltas": deltas.view(-1).tolist(),
            "processor_text": case["texts"],
            "logits_abs_max_valid": float(lv.abs().max()),
            "logits_std_valid": float(lv.std()),
        }
    (ref_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# --------------------------------------------------------------------------------------------
# pixel-parity photographs
# --------------------------------------------------------------------------------------------

def pil_resize(arr: np.ndarray, w: int, h: int) -> Image.Image:
    return Image.fromarray(arr).resize((w, h), Image.Resampling.LANCZOS)


def write_photos(img_dir: Path) -> dict:
    img_dir.mkdir(parents=True, exist_ok=True)
    written = {}

    # astronaut: RGB JPEG, square 256x256 (smart_resize on a square hits the exact 112/28=4.0 boundary)
    im = pil_resize(skimage.data.astronaut(), 256, 256)
    im.save(img_dir / "astronaut.jpg", "JPEG", quality=88)
    written["astronaut.jpg"] = "RGB JPEG 256x256 (w x h)"

    # coffee: RGB PNG 200x134
    im = pil_resize(skimage.data.coffee(), 200, 134)
    im.save(img_dir / "coffee.png", "PNG", optimize=True)
    written["coffee.png"] = "RGB PNG 200x134"

    # camera: grayscale L PNG, crop to 512x307 then 200x120
    cam = skimage.data.camera()[100:407, :]
    im = pil_resize(cam, 200, 120)
    assert im.mode == "L"
    im.save(img_dir / "camera_gray.png", "PNG", optimize=True)
    written["camera_gray.png"] = "L PNG 200x120"

    # chelsea: RGBA PNG with a diagonal alpha gradient; 105x70 so that h/28 = 2.5 (Python banker's rounding)
    rgb = np.asarray(pil_resize(skimage.data.chelsea(), 105, 70))
    yy, xx = np.mgrid[0:70, 0:105]
    alpha = np.clip(255.0 * (0.15 + 0.85 * (xx / 104.0) * (1.0 - 0.5 * yy / 69.0)), 0, 255).astype(np.uint8)
    rgba = np.dstack([rgb, alpha])
    Image.fromarray(rgba).save(img_dir / "chelsea_rgba.png", "PNG", optimize=True)
    written["chelsea_rgba.png"] = "RGBA PNG 105x70, alpha gradient 38..255"

    # rocket: JPEG stored rotated 90 deg CCW with EXIF Orientation=6 (display = rotate 90 deg CW)
    upright = pil_resize(skimage.data.rocket(), 240, 160)  # w=240, h=160 upright
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # CCW -> 160 wide, 240 tall
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(img_dir / "rocket_exif.jpg", "JPEG", quality=88, exif=exif.tobytes())
    written["rocket_exif.jpg"] = "RGB JPEG stored 160x240 with EXIF Orientation=6 (upright 240x160)"

    # coffee palette: 'P' PNG, 60x40 (small: exercises smart_resize's min_pixels branch, upscaling)
    pal = pil_resize(skimage.data.coffee(), 60, 40).quantize(colors=64, method=Image.Quantize.MEDIANCUT,
                                                            dither=Image.Dither.NONE)
    assert pal.mode == "P"
    pal.save(img_dir / "coffee_palette.png", "PNG", optimize=True)
    written["coffee_palette.png"] = "P PNG 60x40, 64-colour palette, no transparency"

    # sanity: the EXIF image decodes upright through load_image
    raw = Image.open(img_dir / "rocket_exif.jpg")
    assert raw.size == (160, 240) and raw.getexif().get(0x0112) == 6
    up = np.asarray(load_image(str(img_dir / "rocket_exif.jpg")), dtype=np.float32)
    assert up.shape == (160, 240, 3)
    err_ok = np.abs(up - np.asarray(upright, dtype=np.float32)).mean()
    err_bad = np.abs(up - np.asarray(upright.transpose(Image.Transpose.ROTATE_180), dtype=np.float32)).mean()
    assert err_ok < 6.0 and err_ok < err_bad / 4, (err_ok, err_bad)
    return written


def write_photo_references(img_dir: Path, versions: dict, described: dict) -> dict:
    ref_dir = img_dir / "reference"
    ref_dir.mkdir(parents=True, exist_ok=True)
    (ref_dir / "preprocessor_config.json").write_text(
        json.dumps(hub_preprocessor_config(MAX_PIXELS_IMAGES), indent=2) + "\n")
    fast = AutoImageProcessor.from_pretrained(ref_dir)  # default backend in 5.24 -> torchvision
    slow = AutoImageProcessor.from_pretrained(ref_dir, backend="pil")  # == old use_fast=False
    assert type(fast) is Qwen2VLImageProcessor, type(fast)
    assert type(slow) is Qwen2VLImageProcessorPil, type(slow)
    meta = {
        "versions": versions,
        "processor_config": "preprocessor_config.json (this folder)",
        "fast_class": f"{type(fast).__module__}.{type(fast).__name__}",
        "slow_class": f"{type(slow).__module__}.{type(slow).__name__}",
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS_IMAGES,
        "loading": "transformers.image_utils.load_image(path): PIL open -> ImageOps.exif_transpose -> convert('RGB') "
                   "(alpha is DROPPED, not composited; palette expanded; L replicated)",
        "tensors": "pixel_values_fast f32 [N,1176], pixel_values_slow f32 [N,1176], image_grid_thw i64 [1,3], "
                   "decoded_rgb u8 [H,W,3] (= np.asarray(load_image(path)))",
        "images": {},
    }
    for name in sorted(described):
        path = img_dir / name
        img = load_image(str(path))
        decoded = np.asarray(img, dtype=np.uint8).copy()
        pf = fast(images=[img], return_tensors="pt")
        ps = slow(images=[img], return_tensors="pt")
        assert torch.equal(pf["image_grid_thw"], ps["image_grid_thw"]), name
        grid = pf["image_grid_thw"].long()
        vf, vs = pf["pixel_values"].float(), ps["pixel_values"].float()
        assert vf.shape == vs.shape
        diff = (vf - vs).abs()
        t, gh, gw = grid[0].tolist()
        entry = {
            "description": described[name],
            "file_bytes": path.stat().st_size,
            "pil_mode_on_disk": Image.open(path).mode,
            "loaded_size_wh": list(img.size),
            "resized_hw": [gh * 14, gw * 14],
            "image_grid_thw": [t, gh, gw],
            "num_patches": int(vf.shape[0]),
            "max_abs_fast_minus_slow": float(diff.max()),
            "mean_abs_fast_minus_slow": float(diff.mean()),
            # elements whose uint8 value after resizing differs (one step = 1/255/std ~= 0.0146..0.0150)
            "frac_elems_uint8_step_diff": float((diff > 1e-3).float().mean()),
            # remaining float-only difference (fused (x-255m)/(255s) vs (x/255-m)/s)
            "max_abs_diff_below_one_step": float(diff[diff <= 1e-3].max()) if (diff <= 1e-3).any() else 0.0,
        }
        if name == "chelsea_rgba.png":
            # what the processors do with the raw RGBA image instead (they composite onto white)
            raw = Image.open(path)
            pf2 = fast(images=[raw], return_tensors="pt")["pixel_values"]
            entry["max_abs_direct_rgba_vs_load_image_fast"] = float((pf2 - vf).abs().max())
        save_file({
            "pixel_values_fast": vf.contiguous(),
            "pixel_values_slow": vs.contiguous(),
            "image_grid_thw": grid.contiguous(),
            "decoded_rgb": torch.from_numpy(decoded),
        }, ref_dir / f"{Path(name).stem}.safetensors", metadata={"format": "pt"})
        meta["images"][name] = entry
        print(f"  {name:20s} loaded {img.size} -> resized (h,w)={entry['resized_hw']} grid={entry['image_grid_thw']}"
              f"  |fast-slow| max={entry['max_abs_fast_minus_slow']:.6f} mean={entry['mean_abs_fast_minus_slow']:.6f}"
              f" frac_step={entry['frac_elems_uint8_step_diff']:.5f} max_float={entry['max_abs_diff_below_one_step']:.2e}")
    (ref_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# --------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--allow-other-versions", action="store_true")
    args = ap.parse_args()
    versions = check_versions(args.allow_other_versions)

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # single-threaded CPU kernels -> reproducible reductions
    transformers.logging.set_verbosity_error()

    out: Path = args.out
    crate_manifest = REPO_ROOT / "crates" / "qwen2vl" / "Cargo.toml"
    if out.resolve() == DEFAULT_OUT.resolve() and not crate_manifest.exists():
        # the workspace uses `members = ["crates/*"]`: a crates/qwen2vl/ without Cargo.toml breaks every cargo command
        print(f"WARNING: {crate_manifest} does not exist; cargo will refuse to load the workspace until it does",
              file=sys.stderr)
    for sub in list(MODELS) + ["images"]:
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)

    summary = {}
    for name, spec in MODELS.items():
        print(f"== {name}")
        model = build_model(name, spec)
        info = write_checkpoint(name, spec, model, out)
        meta = write_references(name, spec, model, out, versions)
        # reload check on the multimodal case with two images (covers vision + mrope + lm_head)
        ref = load_file(out / name / "reference" / "two_images.safetensors")
        sample = {k: ref[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                      "mm_token_type_ids")}
        verify_reload(name, spec, model, out, sample)
        ref = load_file(out / name / "reference" / "batch_left_pad.safetensors")
        sample = {k: ref[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                      "mm_token_type_ids")}
        verify_reload(name, spec, model, out, sample)
        n = unique_params(model)
        summary[name] = {"params": n, **info}
        print(f"  params={n}  files={info['weight_files']}")
        for c, m in meta["cases"].items():
            print(f"  {c:15s} grids={m['image_grid_thw']} deltas={m['rope_deltas']} "
                  f"|logits|max={m['logits_abs_max_valid']:.3f} std={m['logits_std_valid']:.3f}")

    print("== images")
    described = write_photos(out / "images")
    write_photo_references(out / "images", versions, described)

    total = dir_size(out)
    print(f"== total fixture size: {total} bytes ({total / 1024 / 1024:.2f} MiB)")
    assert total <= SIZE_LIMIT, total
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
