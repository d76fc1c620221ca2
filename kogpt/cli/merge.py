"""`kogpt merge`: a base model plus a PEFT LoRA adapter (from a kogpt LoRA run, or written by peft) → a
plain HF folder with the update folded into the weights (kogpt.hf.merge.merge_adapter).

    kogpt merge --model skt/kogpt2-base-v2 --adapter runs/nsmc/adapter --out nsmc-merged
"""

from __future__ import annotations

import argparse

NAME = "merge"
HELP = "fold a LoRA adapter (PEFT format) into its base model: a plain HF folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="BASE", help="the base model: a folder, bundled model or hub name")
    p.add_argument("--revision", help="hub revision of the base model")
    p.add_argument("--adapter", required=True, metavar="DIR",
                   help="adapter folder: adapter_config.json + adapter_model.safetensors")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (config, safetensors, tokenizer)")


def run(args: argparse.Namespace) -> int:
    from ..hf.merge import merge_adapter

    out = merge_adapter(args.model, args.adapter, args.out, args.revision)
    print(f"merged {args.adapter} into {args.model}: {out}")
    return 0
