#!/usr/bin/env python3
"""Add Qwen-like tokenizers, chat templates and generation configs to the tiny Qwen2-VL test checkpoints, and
write Hugging Face reference input ids and greedy generations for the Rust chat pipeline.

Purpose
-------
``tools/make_qwen2vl_fixtures.py`` builds the random-weight checkpoints ``tiny-a``, ``tiny-b`` and ``tiny-c`` under
``crates/qwen2vl/tests/fixtures/``. This script runs after it and:

1. trains, per model, a byte-level BPE tokenizer in the Qwen2 layout (NFC normaliser, Qwen2 regex Split +
   ByteLevel pre-tokenizer, ByteLevel decoder) on the Chinese regulation documents of this repository plus
   a few English sentences (``ENGLISH``). The ordinary vocabulary (256 byte tokens + merges) fills exactly the
   ids below the model's lowest special id; the Qwen special tokens sit at the ids of the model's config;
2. writes Qwen2-VL-2B-Instruct's chat template in three places (tiny-a ``chat_template.json``, tiny-b
   ``chat_template.jinja``, tiny-c the ``chat_template`` key of ``tokenizer_config.json``), a
   ``tokenizer_config.json`` for each model and a hub-like ``generation_config.json`` where it is missing;
3. writes ``chat/conversations.json``: rendered prompts and the processor's input ids for a set of chats;
4. writes ``chat/generate.json``: greedy generations (single sequence and a left-padded batch of 3) from
   ``Qwen2VLForConditionalGeneration.generate`` (float32, eager attention) plus the positions it used.

Files it touches (everything else under fixtures/ is left as it is):

    tiny-a/{tokenizer.json, tokenizer_config.json, chat_template.json, generation_config.json}      (added)
    tiny-b/{tokenizer.json, tokenizer_config.json}       (REPLACED: the WordLevel "w<i>" tokenizer written by
            make_qwen2vl_fixtures.py becomes a BPE one; its reference/ tensors never depended on it)
    tiny-b/chat_template.jinja                                                                   (added)
    tiny-c/{tokenizer.json, tokenizer_config.json, generation_config.json}                       (added)
    chat/{conversations.json, generate.json}                                                     (added)

Note: make_qwen2vl_fixtures.py deletes and rebuilds the model directories, so rerun this script after it.

Pinned versions (refuses others unless ``--allow-other-versions``):

    torch 2.15.0, transformers 5.24.0, tokenizers 0.23.3, jinja2 3.1.6 (+ pillow/numpy as installed)

Run from the repository root (deterministic: single thread, CPU, float32; two runs give identical bytes):

    /work/venv/bin/python tools/make_qwen2vl_chat_fixtures.py
"""

from __future__ import annotations

import os

# keep CPU use modest and results reproducible: set before torch / tokenizers start their thread pools
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import jinja2  # noqa: E402
import numpy as np  # noqa: E402
import PIL  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)

PINNED = {"torch": "2.15.0", "transformers": "5.24.0", "tokenizers": "0.23.3", "jinja2": "3.1.6"}

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "crates" / "qwen2vl" / "tests" / "fixtures"
CHAT_DIR = FIXTURES / "chat"
SIZE_LIMIT = 2 * 1024 * 1024  # bytes this script may add

CORPUS_FILES = [
    "examples/regulations/safety-operation.md",
    "crates/rules/tests/data/site-management.utf8.txt",
    "crates/rules/tests/data/electrical-safety.utf8.md",
]
ENGLISH = [
    "The safety inspector checks every site before the work starts.",
    "Workers must wear helmets, safety shoes and high-visibility vests at all times.",
    "Do not operate the machine when the guard is removed or the emergency stop is broken.",
    "Lock out and tag out the electrical panel before you open it.",
    "Keep the fire exits, passages and the area around fire extinguishers clear.",
    "Report any gas leak, exposed cable or missing handrail to the supervisor immediately.",
    "Is it safe to work at height without a harness? No, it is not.",
    "The inspection found three hazards: an open cabinet, a wet floor and a blocked exit.",
    "Please describe the picture and list the risks that you can see in it.",
    "The temperature of the motor is 85 degrees, which is higher than the limit of 70 degrees.",
    "Wear gloves when you handle chemicals, and read the safety data sheet first.",
    "This is a test of the tokenizer with English text, numbers like 220V and 3.5m, and symbols: #@%&!",
]

ENGLISH_REPEAT = 4

# Qwen2 pre-tokenisation regex (== transformers/models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX)
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen/Qwen2-VL-2B-Instruct chat_template.json (hub), verbatim.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content"
    " or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video'"
    " or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# Token ids per model (must agree with each config.json; asserted below). vision_pad: the hub config's
# `vision_token_id` (tiny-a, tiny-c); tiny-b has none in its config, we give <|vision_pad|> a free slot.
MODELS = {
    "tiny-a": dict(vocab=320, ids=dict(image=300, video=301, vision_start=302, vision_end=303, eos=304, pad=305,
                                       bos=306, vision_pad=307),
                   template="chat_template.json", merges_format="string", write_generation_config=True),
    "tiny-b": dict(vocab=336, ids=dict(image=310, video=311, vision_start=308, vision_end=309, eos=312, pad=313,
                                       bos=307, vision_pad=320),
                   template="chat_template.jinja", merges_format="pair", write_generation_config=False),
    "tiny-c": dict(vocab=312, ids=dict(image=296, video=297, vision_start=298, vision_end=299, eos=300, pad=301,
                                       bos=302, vision_pad=303),
                   template="tokenizer_config.json", merges_format="string", write_generation_config=True),
}
ID_TO_TOKEN_NAME = {
    "pad": "<|endoftext|>", "bos": "<|im_start|>", "eos": "<|im_end|>", "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>", "vision_pad": "<|vision_pad|>", "image": "<|image_pad|>", "video": "<|video_pad|>",
}
# more of Qwen2-VL's special tokens, placed (in this order) in the lowest free ids above the model's specials;
# the remaining ids up to vocab_size stay unassigned (as on the hub: 151657..151935 have no token).
EXTRA_SPECIAL = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                 "<|quad_end|>"]

MIN_PIXELS = 3136
MAX_PIXELS = 12544
IMAGE_SIZE_KW = {"size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}}
PROCESSOR_KWARGS = {"images_kwargs": IMAGE_SIZE_KW}
MAX_NEW_TOKENS = 32


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def check_versions(allow_other: bool) -> dict:
    found = {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "jinja2": jinja2.__version__,
    }
    bad = {k: (v, PINNED[k]) for k, v in found.items() if v != PINNED[k]}
    if bad and not allow_other:
        sys.exit(f"version mismatch (found, pinned): {bad}; pass --allow-other-versions to ignore")
    found.update({"numpy": np.__version__, "pillow": PIL.__version__, "python": sys.version.split()[0]})
    return found


def dump_json(path: Path, obj, indent=2) -> None:
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def token_table(spec: dict) -> dict[int, str]:
    """id -> special token content for every added token of the model."""
    ids = spec["ids"]
    table = {ids[k]: v for k, v in ID_TO_TOKEN_NAME.items()}
    assert len(table) == len(ID_TO_TOKEN_NAME), "duplicate special id"
    lowest = min(table)
    free = [i for i in range(lowest, spec["vocab"]) if i not in table]
    for name, i in zip(EXTRA_SPECIAL, free):
        table[i] = name
    return dict(sorted(table.items()))


def check_config_ids(name: str, spec: dict) -> None:
    cfg = json.loads((FIXTURES / name / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    ids = spec["ids"]
    assert text["vocab_size"] == spec["vocab"], name
    assert cfg["image_token_id"] == ids["image"] and cfg["video_token_id"] == ids["video"], name
    assert cfg["vision_start_token_id"] == ids["vision_start"] and cfg["vision_end_token_id"] == ids["vision_end"]
    assert text["eos_token_id"] == ids["eos"] and text["pad_token_id"] == ids["pad"] and text["bos_token_id"] == ids["bos"]
    if "vision_token_id" in cfg:
        assert cfg["vision_token_id"] == ids["vision_pad"], name


# --------------------------------------------------------------------------------------------
# 1. tokenizer
# --------------------------------------------------------------------------------------------

def corpus() -> list[str]:
    docs = [(REPO_ROOT / p).read_text(encoding="utf-8") for p in CORPUS_FILES]
    # the English sentences are repeated so that the merges mix English (' t', 'he', ' the') and Chinese
    return docs + ENGLISH * ENGLISH_REPEAT


def qwen2_pipeline(tk: Tokenizer) -> None:
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)


def train_bpe(n_regular: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE with exactly n_regular = 256 + merges tokens, bytes in GPT-2 order at ids 0..255."""
    tk = Tokenizer(models.BPE())
    qwen2_pipeline(tk)
    trainer = trainers.BpeTrainer(vocab_size=n_regular, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus(), trainer=trainer)
    model = json.loads(tk.to_str())["model"]
    vocab, merges = model["vocab"], [tuple(m) for m in model["merges"]]
    assert len(vocab) == n_regular and len(merges) == n_regular - 256, (len(vocab), len(merges))
    # rebuild ids: 0..255 = bytes in bytes_to_unicode order (sorted by code point == GPT-2/Qwen order), then merges
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    assert len(alphabet) == 256
    new_vocab = {ch: i for i, ch in enumerate(alphabet)}
    for a, b in merges:
        new_vocab[a + b] = len(new_vocab)
    assert len(new_vocab) == n_regular, "a merge produced a duplicate token"
    assert set(new_vocab) == set(vocab)
    return new_vocab, merges


def tokenizer_json(spec: dict) -> dict:
    specials = token_table(spec)
    lowest = min(specials)
    vocab, merges = train_bpe(lowest)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": True}
            for i, c in specials.items()
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
            byte_level,
        ]},
        "post_processor": dict(byte_level),
        "decoder": dict(byte_level),
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab,
            # hub Qwen2 files use the legacy "a b" strings; tokenizers >= 0.20 writes [a, b] pairs
            "merges": [f"{a} {b}" for a, b in merges] if spec["merges_format"] == "string" else [[a, b] for a, b in merges],
        },
    }


ROUND_TRIP = [
    "安全检查：配电箱必须上锁，严禁带电作业！",
    "The inspector found 3 hazards at 10:30 a.m.",
    "Emoji ⚠️🔥👷‍♀️🦺 and 中文混排，“引号”（括号）……《标准》、顿号；",
    "  leading spaces, tabs\tand\nnew lines\r\n\n  end  ",
    "It's we'll they've I'M — ümlaut café naïve Ω ≥ 1 ² ½",
    "",
    "<|im_start|>user\nhi<|im_end|>\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>",
]


def check_tokenizer(name: str, path: Path, spec: dict) -> dict:
    tk = Tokenizer.from_file(str(path))
    specials = token_table(spec)
    lowest = min(specials)
    assert tk.get_vocab_size(with_added_tokens=False) == lowest
    for i, c in specials.items():
        assert tk.token_to_id(c) == i and tk.id_to_token(i) == c, (name, i, c)
    for i in range(spec["vocab"]):
        if i >= lowest and i not in specials:
            assert tk.id_to_token(i) is None, (name, i)
    for s in ROUND_TRIP:
        enc = tk.encode(s, add_special_tokens=True)
        assert tk.decode(enc.ids, skip_special_tokens=False) == s, (name, s, enc.tokens)
        assert all(i < lowest or i in specials for i in enc.ids)
    # specials are split out as single tokens, ordinary text never maps to a special id
    enc = tk.encode("<|im_start|>a<|image_pad|><|image_pad|>")
    assert enc.ids[0] == spec["ids"]["bos"] and enc.ids[-2:] == [spec["ids"]["image"]] * 2
    assert all(i < lowest for i in tk.encode(ROUND_TRIP[2]).ids)
    # transformers' tokenizer loaded from the directory must agree with the raw tokenizers file
    htk = AutoTokenizer.from_pretrained(FIXTURES / name)
    for s in ROUND_TRIP:
        assert htk(s, add_special_tokens=True)["input_ids"] == tk.encode(s).ids, (name, s)
        assert htk.decode(tk.encode(s).ids) == s
    assert htk.eos_token_id == spec["ids"]["eos"] and htk.pad_token_id == spec["ids"]["pad"]
    assert htk.bos_token is None and htk.padding_side == "left", (htk.bos_token, htk.padding_side)
    sample = tk.encode(ROUND_TRIP[2])
    return {"n_merges": lowest - 256, "sample": ROUND_TRIP[2], "sample_ids": sample.ids,
            "tokenizer_class": type(htk).__name__}


# --------------------------------------------------------------------------------------------
# 2. tokenizer_config.json, chat template, generation_config.json
# --------------------------------------------------------------------------------------------

def tokenizer_config(spec: dict, with_template: bool) -> dict:
    specials = token_table(spec)
    cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True}
            for i, c in specials.items()
        },
        "additional_special_tokens": [c for c in specials.values() if c not in ("<|endoftext|>",)],
        "bos_token": None,
    }
    if with_template:
        cfg["chat_template"] = QWEN2_VL_CHAT_TEMPLATE
    cfg.update({
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "processor_class": "Qwen2VLProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    return cfg


def generation_config(spec: dict) -> dict:
    ids = spec["ids"]
    return {
        "bos_token_id": ids["bos"],
        "do_sample": True,
        "eos_token_id": [ids["eos"]],
        "pad_token_id": ids["pad"],
        "repetition_penalty": 1.05,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
        "transformers_version": "4.45.0.dev0",
    }


def write_model_files(name: str, spec: dict) -> dict:
    d = FIXTURES / name
    written = []
    dump_json(d / "tokenizer.json", tokenizer_json(spec))
    written.append("tokenizer.json")
    dump_json(d / "tokenizer_config.json", tokenizer_config(spec, spec["template"] == "tokenizer_config.json"))
    written.append("tokenizer_config.json")
    if spec["template"] == "chat_template.json":
        dump_json(d / "chat_template.json", {"chat_template": QWEN2_VL_CHAT_TEMPLATE})
        written.append("chat_template.json")
    elif spec["template"] == "chat_template.jinja":
        (d / "chat_template.jinja").write_text(QWEN2_VL_CHAT_TEMPLATE, encoding="utf-8")
        written.append("chat_template.jinja")
    if spec["write_generation_config"]:  # tiny-b keeps the one save_pretrained wrote (no sampling defaults)
        dump_json(d / "generation_config.json", generation_config(spec))
        written.append("generation_config.json")
    return {"written": written}


# --------------------------------------------------------------------------------------------
# 3. conversations -> rendered text and input ids
# --------------------------------------------------------------------------------------------

def img(path: str) -> dict:
    return {"type": "image", "image": path}


def txt(text: str) -> dict:
    return {"type": "text", "text": text}


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


# Each case: model, messages, add_generation_prompt, continue_final_message, add_vision_id (template variable).
CASES = [
    # ---- tiny-a: template from chat_template.json -------------------------------------------
    dict(name="a_zh_one_image_default_system", model="tiny-a",
         messages=[user(img("images/coffee.png"), txt("请描述这张图片中的安全隐患。"))], add_generation_prompt=True),
    dict(name="a_en_text_only_system", model="tiny-a",
         messages=[{"role": "system", "content": [txt("You are a strict safety inspector.")]},
                   user(txt("Is it safe to work at height without a harness?"))], add_generation_prompt=True),
    dict(name="a_multi_turn_image", model="tiny-a",
         messages=[user(img("images/astronaut.jpg"), txt("这是谁？")),
                   {"role": "assistant", "content": [txt("这是一名宇航员。")]},
                   user(txt("他穿戴了防护装备吗？"))], add_generation_prompt=True),
    dict(name="a_emoji_text_only", model="tiny-a",
         messages=[user(txt("Check this ⚠️🔥 hazard 👷‍♀️🦺! 安全第一❤️"))], add_generation_prompt=True),
    dict(name="a_assistant_prefix_continue", model="tiny-a",
         messages=[user(img("images/camera_gray.png"), txt("图中有什么？")),
                   {"role": "assistant", "content": [txt("图中有一个")]}],
         add_generation_prompt=False, continue_final_message=True),
    dict(name="a_whitespace_newlines", model="tiny-a",
         messages=[user(txt("第一行\n\n  第二行\t制表符   多个空格\r\nlast line  "))], add_generation_prompt=True),
    # ---- tiny-b: template from chat_template.jinja ------------------------------------------
    dict(name="b_zh_two_images", model="tiny-b",
         messages=[user(img("images/coffee.png"), img("images/astronaut.jpg"), txt("比较这两张图片，哪一张有安全风险？"))],
         add_generation_prompt=True),
    dict(name="b_en_image_at_end", model="tiny-b",
         messages=[user(txt("Look at the following photo and list the hazards:"), img("images/rocket_exif.jpg"))],
         add_generation_prompt=True),
    dict(name="b_zh_system_mixed_punctuation", model="tiny-b",
         messages=[{"role": "system", "content": "你是一名电气安全检查员。"},
                   user(txt("检查：“配电箱”是否上锁？（请回答‘是’或‘否’）……【注意】《规程》第3条、第5条；"))],
         add_generation_prompt=True),
    dict(name="b_string_content_multi_turn", model="tiny-b",
         messages=[{"role": "user", "content": "What should I wear on site?"},
                   {"role": "assistant", "content": "A helmet, safety shoes and a vest."},
                   {"role": "user", "content": "还有别的吗？"}], add_generation_prompt=True),
    dict(name="b_no_generation_prompt", model="tiny-b",
         messages=[user(img("images/chelsea_rgba.png"), txt("What animal is this?")),
                   {"role": "assistant", "content": [txt("A cat.")]}], add_generation_prompt=False),
    # ---- tiny-c: template from tokenizer_config.json ----------------------------------------
    dict(name="c_three_images_interleaved", model="tiny-c",
         messages=[user(txt("图1："), img("images/coffee_palette.png"), txt("图2："), img("images/chelsea_rgba.png"),
                        txt("图3："), img("images/camera_gray.png"), txt("哪张是灰度图？"))],
         add_generation_prompt=True),
    dict(name="c_add_vision_id", model="tiny-c",
         messages=[user(img("images/coffee.png"), img("images/camera_gray.png"), txt("Which picture is grayscale?"))],
         add_generation_prompt=True, add_vision_id=True),
    dict(name="c_en_numbers_symbols", model="tiny-c",
         messages=[{"role": "system", "content": [txt("Answer briefly.")]},
                   user(txt("Voltage 380V, 3-phase; current 12.5A. Is the 4mm² cable OK? It's rated 32A."))],
         add_generation_prompt=True),
    dict(name="c_images_in_two_turns", model="tiny-c",
         messages=[user(img("images/coffee.png"), txt("这是什么？")),
                   {"role": "assistant", "content": [txt("一杯咖啡。")]},
                   user(img("images/astronaut.jpg"), txt("这张呢？"))], add_generation_prompt=True),
    dict(name="c_zh_emoji_image", model="tiny-c",
         messages=[user(img("images/rocket_exif.jpg"), txt("安全第一🦺，生命至上❤️！这枚火箭🚀安全吗？"))],
         add_generation_prompt=True),
]


def load_processor(name: str) -> Qwen2VLProcessor:
    proc = AutoProcessor.from_pretrained(FIXTURES / name)
    assert type(proc) is Qwen2VLProcessor, type(proc)
    assert proc.tokenizer.padding_side == "left"
    return proc


def template_for(name: str, proc) -> str | None:
    """The template the processor should use. transformers 5.24's ProcessorMixin reads chat_template.jinja /
    chat_template.json but NOT the tokenizer_config.json key, so tiny-c's must be passed explicitly."""
    if proc.chat_template is not None:
        assert proc.chat_template == QWEN2_VL_CHAT_TEMPLATE
        return None
    assert name == "tiny-c" and proc.tokenizer.chat_template == QWEN2_VL_CHAT_TEMPLATE
    return proc.tokenizer.chat_template


def images_in_order(messages) -> list[str]:
    out = []
    for m in messages:
        if isinstance(m["content"], list):
            out += [p["image"] for p in m["content"] if p.get("type") == "image"]
    return out


def run_chat(proc, name, messages, add_generation_prompt, continue_final_message=False, add_vision_id=False,
             padding=False):
    """processor.apply_chat_template(tokenize=True); batched when messages is a list of conversations."""
    extra = {"add_vision_id": True} if add_vision_id else {}
    pk = dict(PROCESSOR_KWARGS, **({"padding": True} if padding else {}))
    common = dict(chat_template=template_for(name, proc), add_generation_prompt=add_generation_prompt,
                  continue_final_message=continue_final_message, **extra)
    text = proc.apply_chat_template(copy.deepcopy(messages), tokenize=False, **common)
    out = proc.apply_chat_template(copy.deepcopy(messages), tokenize=True, return_dict=True, return_tensors="pt",
                                   processor_kwargs=pk, **common)
    return text, out


def check_independent_render(proc, name, case, text) -> None:
    """Render with plain jinja2 (as the hub template expects) and re-run the processor on text + loaded images."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    raw = env.from_string(QWEN2_VL_CHAT_TEMPLATE).render(
        messages=case["messages"], add_generation_prompt=case["add_generation_prompt"],
        add_vision_id=case.get("add_vision_id", False))
    if case.get("continue_final_message"):
        # transformers strips everything after the final message's text (here "<|im_end|>\n")
        last = case["messages"][-1]["content"]
        last = last if isinstance(last, str) else last[-1]["text"]
        raw = raw[: raw.rindex(last) + len(last)]
    assert raw == text, (name, case["name"], raw, text)


def make_conversations(procs) -> list[dict]:
    from transformers.image_utils import load_image

    out = []
    for case in CASES:
        name = case["model"]
        proc = procs[name]
        agp = case["add_generation_prompt"]
        cfm = case.get("continue_final_message", False)
        avid = case.get("add_vision_id", False)
        text, enc = run_chat(proc, name, case["messages"], agp, cfm, avid)
        check_independent_render(proc, name, case, text)
        images = images_in_order(case["messages"])
        ids = enc["input_ids"][0].tolist()
        grids = enc["image_grid_thw"].tolist() if "image_grid_thw" in enc else []
        # equivalently: processor(text=rendered, images=load_image(path)...)
        kw = dict(text=[text], return_tensors="pt", images_kwargs=IMAGE_SIZE_KW)
        if images:
            kw["images"] = [load_image(p) for p in images]
        enc2 = proc(**kw)
        assert enc2["input_ids"][0].tolist() == ids, case["name"]
        if images:
            assert enc2["image_grid_thw"].tolist() == grids
            assert torch.equal(enc2["pixel_values"], enc["pixel_values"])
        assert len(grids) == len(images)
        spec = MODELS[name]
        n_pad = sum(t * h * w // 4 for t, h, w in grids)
        assert ids.count(spec["ids"]["image"]) == n_pad
        assert enc["attention_mask"].min() == 1
        mm = enc["mm_token_type_ids"][0].tolist()
        assert mm == [1 if i == spec["ids"]["image"] else 0 for i in ids]
        # the tokenizer alone on the unexpanded prompt gives the same ids with image pads collapsed
        tk_ids = proc.tokenizer(text, add_special_tokens=False)["input_ids"]
        collapsed = []
        for i in ids:
            if not (i == spec["ids"]["image"] and collapsed and collapsed[-1] == i):
                collapsed.append(i)
        assert collapsed == tk_ids, case["name"]
        entry = {
            "name": case["name"],
            "model": name,
            "messages": case["messages"],
            "add_generation_prompt": agp,
            "continue_final_message": cfm,
            "template_source": MODELS[name]["template"],
        }
        if avid:
            entry["template_kwargs"] = {"add_vision_id": True}
        entry.update({
            "images": images,
            "text": text,
            "input_ids": ids,
            "image_grid_thw": grids,
        })
        out.append(entry)
        print(f"  {case['name']:34s} {name}  len={len(ids):4d} images={len(images)} grids={grids}")
    return out


# --------------------------------------------------------------------------------------------
# 4./5. greedy generation references
# --------------------------------------------------------------------------------------------

SINGLE = {  # one image + a short Chinese prompt
    "tiny-a": ("images/coffee.png", "图中有什么危险？"),
    "tiny-b": ("images/astronaut.jpg", "描述这张图片。"),
    "tiny-c": ("images/camera_gray.png", "这是什么？"),
}
BATCH = [  # different image sizes and prompt lengths
    ("images/coffee.png", "这张图片里有什么？"),
    ("images/astronaut.jpg", "请详细描述这个人穿的衣服和装备，并说明是否符合现场安全管理规定。"),
    ("images/camera_gray.png", "Describe."),
]

# generation_config sampling defaults switched off explicitly (tiny-a/tiny-c have do_sample, temperature, top_p,
# top_k, repetition_penalty in generation_config.json)
GREEDY_KW = dict(do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS, temperature=None, top_p=None,
                 top_k=None, repetition_penalty=None)


def load_model(name: str):
    model = Qwen2VLForConditionalGeneration.from_pretrained(FIXTURES / name, attn_implementation="eager",
                                                            dtype=torch.float32)
    gc = model.generation_config
    if MODELS[name]["write_generation_config"]:  # sampling defaults are loaded, GREEDY_KW must switch them off
        assert gc.do_sample is True and gc.repetition_penalty == 1.05 and gc.top_k == 20, gc
    assert gc.pad_token_id == MODELS[name]["ids"]["pad"]
    return model.eval()


class PositionRecorder:
    """Records the position_ids each language-model forward receives during generate()."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.model.language_model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append(kwargs["position_ids"].detach().clone())

    def close(self):
        self.handle.remove()


def generate(model, enc, spec):
    inputs = {k: v for k, v in enc.items()}
    model.model.rope_deltas = None
    rec = PositionRecorder(model)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, **GREEDY_KW, return_dict_in_generate=True, output_scores=True,
                                 output_logits=True)
    finally:
        rec.close()
    # greedy proof: no logits processor changed anything, every token is the argmax of the raw logits
    for s, l in zip(out.scores, out.logits):
        assert torch.equal(s, l), "a logits processor is active: generation is not plain greedy"
    S = inputs["input_ids"].shape[1]
    seqs = out.sequences[:, S:]
    assert seqs.shape[1] == len(out.logits)
    return out, seqs, rec.calls, model.model.rope_deltas.clone()


def row_margin(out, b: int, n_tokens: int) -> float:
    """Smallest gap between the best and second-best raw logit over the row's generated steps (how robust the
    greedy choice is against float differences); also checks each token is the argmax."""
    m = float("inf")
    for step in range(n_tokens):
        l = out.logits[step][b]
        top2 = torch.topk(l, 2)
        assert int(top2.indices[0]) == int(out.sequences[b, -len(out.logits) + step])
        m = min(m, float(top2.values[0] - top2.values[1]))
    return round(m, 4)


def split_row(gen: list[int], spec: dict) -> tuple[list[int], bool]:
    eos = spec["ids"]["eos"]
    if eos in gen:
        k = gen.index(eos)
        rest = gen[k + 1:]
        assert all(t == spec["ids"]["pad"] for t in rest), "generate appends pad after eos"
        return gen[: k + 1], True
    return gen, False


def manual_greedy(model, enc, spec) -> list[int]:
    """Independent reference: full forward without cache on the growing sequence, argmax, stop at eos."""
    ids = enc["input_ids"].clone()
    mm = enc["mm_token_type_ids"].clone()
    out = []
    with torch.no_grad():
        for _ in range(MAX_NEW_TOKENS):
            model.model.rope_deltas = None
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=enc["pixel_values"],
                           image_grid_thw=enc["image_grid_thw"], mm_token_type_ids=mm).logits
            t = int(logits[0, -1].argmax())
            out.append(t)
            if t == spec["ids"]["eos"]:
                break
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
            mm = torch.cat([mm, torch.zeros((1, 1), dtype=mm.dtype)], dim=1)
    model.model.rope_deltas = None
    return out


def positions_summary(calls, attention_mask, n_steps):
    """prefill: [4,B,S] (row 0 = text positions from attention_mask.cumsum-1, rows 1..3 = M-RoPE t/h/w);
    decode step k: [4,B,1]. Returns per row the last prefill position (3 axes) and the decode positions."""
    prefill = calls[0]
    assert prefill.shape[0] == 4, prefill.shape
    B = prefill.shape[1]
    rows = []
    for b in range(B):
        valid = attention_mask[b].bool()
        mpos = prefill[1:, b][:, valid]  # [3, n_valid]
        last = prefill[1:, b, -1].tolist()
        assert last[0] == last[1] == last[2] == int(mpos.max()), (last, int(mpos.max()))
        dec_m, dec_t = [], []
        for c in calls[1:]:
            assert c.shape == (4, B, 1), c.shape
            p = c[1:, b, 0].tolist()
            assert p[0] == p[1] == p[2]
            dec_m.append(p[0])
            dec_t.append(int(c[0, b, 0]))
        assert dec_m == [last[0] + 1 + k for k in range(len(dec_m))]
        rows.append({
            "prefill_max_position": int(mpos.max()),
            "prefill_last_text_position": int(prefill[0, b, -1]),
            "decode_mrope_positions": dec_m,
            "decode_text_positions": dec_t,
        })
    assert len(calls) - 1 <= n_steps - 1
    return rows


def make_generate(procs, models) -> dict:
    result = {
        "settings": {
            "generate_kwargs": {k: v for k, v in GREEDY_KW.items()},
            "dtype": "float32",
            "attn_implementation": "eager",
            "processor_kwargs": PROCESSOR_KWARGS,
            "greedy_check": "generate(output_scores, output_logits): processed scores == raw logits at every step "
                            "(no logits processor active); single sequences also equal a cache-free argmax loop",
        },
        "models": {},
    }
    for name, proc in procs.items():
        spec = MODELS[name]
        model = models[name]
        entry = {}
        # ---- (a) single sequence ----------------------------------------------------------
        image, prompt = SINGLE[name]
        messages = [user(img(image), txt(prompt))]
        text, enc = run_chat(proc, name, messages, add_generation_prompt=True)
        out, seqs, calls, deltas = generate(model, enc, spec)
        gen = seqs[0].tolist()
        new_tokens, hit_eos = split_row(gen, spec)
        ref = manual_greedy(model, enc, spec)
        assert ref == new_tokens, (name, ref, new_tokens)
        decoded = proc.tokenizer.decode(new_tokens, skip_special_tokens=True)
        raw_tk = Tokenizer.from_file(str(FIXTURES / name / "tokenizer.json"))
        assert decoded == raw_tk.decode(new_tokens, skip_special_tokens=True)
        unassigned = sorted({t for t in new_tokens if raw_tk.id_to_token(t) is None})
        # ids without a token (e.g. tiny-a 314) are skipped by decode
        assert decoded == raw_tk.decode([t for t in new_tokens if t not in unassigned], skip_special_tokens=True)
        pos = positions_summary(calls, enc["attention_mask"], len(gen))[0]
        entry["single"] = {
            "messages": messages,
            "images": [image],
            "text": text,
            "input_ids": enc["input_ids"][0].tolist(),
            "image_grid_thw": enc["image_grid_thw"].tolist(),
            "new_tokens": new_tokens,
            "stopped_at_eos": hit_eos,
            "decoded_text": decoded,
            "decoded_text_with_special": proc.tokenizer.decode(new_tokens, skip_special_tokens=False),
            "unassigned_ids_in_new_tokens": unassigned,
            "min_top2_logit_margin": row_margin(out, 0, len(new_tokens)),
            "rope_delta": int(deltas[0, 0]),
            **pos,
        }
        print(f"  {name} single: prompt {len(entry['single']['input_ids'])} tokens, {len(new_tokens)} new, "
              f"eos={hit_eos} {new_tokens}")
        # ---- (b) left-padded batch of 3 -----------------------------------------------------
        convs = [[user(img(im), txt(p))] for im, p in BATCH]
        texts, benc = run_chat(proc, name, convs, add_generation_prompt=True, padding=True)
        am = benc["attention_mask"]
        assert (am[:, -1] == 1).all() and (am[:, 0] == 0).any(), "expected left padding"
        out, seqs, calls, deltas = generate(model, benc, spec)
        positions = positions_summary(calls, am, seqs.shape[1])
        rows = []
        for b in range(len(convs)):
            gen = seqs[b].tolist()
            new_tokens, hit_eos = split_row(gen, spec)
            # the same conversation alone (no padding) through generate
            _, senc = run_chat(proc, name, convs[b], add_generation_prompt=True)
            n_pad = int((am[b] == 0).sum())
            assert senc["input_ids"][0].tolist() == benc["input_ids"][b, n_pad:].tolist()
            _, sseqs, _, sdeltas = generate(model, senc, spec)
            alone, _ = split_row(sseqs[0].tolist(), spec)
            assert int(sdeltas[0, 0]) == int(deltas[b, 0]), "get_rope_index ignores the padding (masked)"
            rows.append({
                "images": [BATCH[b][0]],
                "text": texts[b],
                "input_ids": benc["input_ids"][b].tolist(),
                "attention_mask": am[b].tolist(),
                "num_left_pad": n_pad,
                "new_tokens": new_tokens,
                "stopped_at_eos": hit_eos,
                "generated_with_trailing_pad": gen,
                "equals_unbatched_generate": alone == new_tokens,
                "min_top2_logit_margin": row_margin(out, b, len(new_tokens)),
                "rope_delta": int(deltas[b, 0]),
                **positions[b],
            })
            assert alone == new_tokens, (name, b, alone, new_tokens)  # padding / finished rows change nothing
            print(f"  {name} batch[{b}]: {len(new_tokens)} new, eos={hit_eos}, pad={n_pad}, "
                  f"same as alone={alone == new_tokens}")
        entry["batch"] = {
            "messages": convs,
            "image_grid_thw": benc["image_grid_thw"].tolist(),
            "generated_steps": int(seqs.shape[1]),
            "rows": rows,
        }
        result["models"][name] = entry
    return result


# --------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--allow-other-versions", action="store_true")
    args = ap.parse_args()
    versions = check_versions(args.allow_other_versions)

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.chdir(FIXTURES)  # image paths in the messages are relative to fixtures/

    summary = {}
    for name, spec in MODELS.items():
        check_config_ids(name, spec)
        info = write_model_files(name, spec)
        info.update(check_tokenizer(name, FIXTURES / name / "tokenizer.json", spec))
        summary[name] = info
        print(f"== {name}: {info['n_merges']} merges, specials {token_table(spec)}, wrote {info['written']}")

    procs = {name: load_processor(name) for name in MODELS}
    CHAT_DIR.mkdir(parents=True, exist_ok=True)
    print("== conversations")
    conversations = make_conversations(procs)
    dump_json(CHAT_DIR / "conversations.json", conversations, indent=1)

    print("== generate")
    models = {name: load_model(name) for name in MODELS}
    gen = make_generate(procs, models)
    gen["versions"] = versions
    gen["token_ids"] = {name: {"specials": {str(k): v for k, v in token_table(spec).items()},
                               "regular_vocab": min(token_table(spec)), "vocab_size": spec["vocab"]}
                        for name, spec in MODELS.items()}
    dump_json(CHAT_DIR / "generate.json", gen, indent=1)

    added = 0
    for p in sorted(FIXTURES.rglob("*")):
        if p.is_file() and (p.parent == CHAT_DIR or p.name in ("tokenizer.json", "tokenizer_config.json",
                                                               "chat_template.json", "chat_template.jinja")
                            or (p.name == "generation_config.json" and p.parent.name != "tiny-b")):
            added += p.stat().st_size
            print(f"  {p.relative_to(FIXTURES)}  {p.stat().st_size}")
    after = {p: p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file()}
    print(f"== files written by this script: {added} bytes; fixtures total {sum(after.values())} bytes")
    assert added <= SIZE_LIMIT, added


if __name__ == "__main__":
    main()
