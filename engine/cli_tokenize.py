"""`unclip tokenize`: write a prompt's token ids for the native runtime's C++ program (`unclip-native`).

    unclip tokenize "a red circle" [more prompts ...] (--model DIR | --preset NAME) --out ids.json

The C++ runtime takes token ids and attention masks, not text (as TensorRT-LLM's runtime does): the CLIP
tokenizer stays in Python. DIR may be a diffusers folder or a native export folder (its tokenizer/).
The file: {"format": "unclip-ids", "prompts": [...], "input_ids": [[...]], "attention_mask": [[...]]}.
"""
from __future__ import annotations

import os

COMMANDS = ("tokenize",)
FORMAT = "unclip-ids"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("tokenize", help="write token ids of prompts for the unclip-native program",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("prompts", nargs="+", help="one or more prompts (one image row each)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a diffusers folder or a native export folder (uses its tokenizer/)")
    src.add_argument("--preset", default=None, help="a preset's tokenizer (default: toy)")
    p.add_argument("--out", required=True, help="the ids file to write (JSON)")


def tokenizer_for(model: str | None, preset: str | None):
    from .tokenizer import CLIPTokenizer
    if model:
        folder = os.path.join(model, "tokenizer")
        if not os.path.isdir(folder):
            raise ValueError(f"--model: {model} has no tokenizer/ folder (a diffusers or native export folder)")
        return CLIPTokenizer.from_folder(folder)
    from .presets import build_preset, default_preset
    return build_preset(preset or default_preset()).tokenizer


def write_ids(tokenizer, prompts: list[str], out: str) -> None:
    from .files import atomic_write_json
    tokens = tokenizer(list(prompts))
    atomic_write_json(out, {"format": FORMAT, "prompts": list(prompts),
                            "input_ids": tokens.input_ids.tolist(),
                            "attention_mask": tokens.attention_mask.long().tolist()})


def run(args) -> int:
    write_ids(tokenizer_for(args.model, args.preset), args.prompts, args.out)
    print(args.out)
    return 0
