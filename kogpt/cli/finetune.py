"""`kogpt finetune`: a classification / regression head on a GPT for NSMC, KLUE-YNAT, KorSTS, KLUE-STS.

Every FinetuneConfig field is a flag, documented once in kogpt/finetune.py. Runs on the pretraining
loop (bf16, progress bar, atomic checkpoints, --resume, torchrun); the best validation checkpoint
is written to OUT/model in HF format, which `kogpt eval --model OUT/model` scores with its head.
"""

from __future__ import annotations

import argparse

NAME = "finetune"
HELP = "finetune a GPT with a classification/regression head on nsmc, ynat, korsts or klue-sts"
EPILOG = """examples:
  kogpt finetune --model kogpt-mini --task nsmc --train ratings_train.txt --out runs/nsmc
  kogpt finetune --model DIR --task korsts --train sts-train.tsv --val sts-dev.tsv --out runs/korsts --epochs 5
  kogpt eval --model runs/nsmc/model --task nsmc --data ratings_test.txt
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..training.finetune import FIELDS, SECTIONS
    from .common import default_model

    p.epilog, p.formatter_class = EPILOG, argparse.RawDescriptionHelpFormatter
    group = p
    for name, f in FIELDS.items():
        if name in SECTIONS:
            group = p.add_argument_group(SECTIONS[name])
        default = (default_model() or "") if name == "model" else f.default
        flag, help = "--" + name.replace("_", "-"), f.metadata["help"] + (f" (default: {default!r})" if default else "")
        if f.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)
        else:
            metavar = f.metadata.get("metavar") or {"int": "N", "float": "X"}.get(f.type, name.split("_")[-1].upper())
            group.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type], default=default,
                               metavar=metavar, help=help)
    p.add_argument("-d", "--debug", action="store_true", help="show full tracebacks")


def run(args: argparse.Namespace) -> int:
    from ..training.finetune import FIELDS, FinetuneConfig, finetune

    result = finetune(FinetuneConfig(**{k: v for k, v in vars(args).items() if k in FIELDS}))
    return 128 + result.signal if result.signal else 0
