"""`kogpt finetune`: a classification / regression head on a GPT for NSMC, KLUE-YNAT, KorSTS, KLUE-STS.

Every FinetuneConfig field is a flag, and so are the settings of the training loop it holds (TrainConfig
fields, spelled and checked as in `kogpt train`, with the KoGPT2-subtasks recipe's defaults). Runs on
the pretraining loop (bf16, progress bar, atomic checkpoints, --resume, torchrun); the best validation
checkpoint is written to OUT/model in HF format, which `kogpt eval --model OUT/model` scores with its head.
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


# `kogpt finetune --help`, group by group: FinetuneConfig's own settings and those of its loop (TrainConfig)
GROUPS = {
    "what to finetune, on what": "model revision task train val val_fraction out limit",
    "batch and schedule (the KoGPT2-subtasks recipe: 32 × 4 = 128 inputs a step)":
        "epochs max_steps batch_size grad_accum seq_len lr warmup weight_decay dropout",
    "validation, logging and checkpoints": "eval_every eval_batch_size save_every keep_last log_every resume overwrite",
    "LoRA: adapters on a frozen bf16 base, plus the head": "lora_r lora_alpha lora_dropout lora_targets",
    "runtime": "seed dtype device fsdp grad_checkpoint progress",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..training.finetune import FIELDS, LOOP_HELP, FinetuneConfig
    from .config_flags import add_composed_flags

    add_composed_flags(p, GROUPS, FIELDS, FinetuneConfig(), LOOP_HELP, EPILOG)


def run(args: argparse.Namespace) -> int:
    from ..training.finetune import FIELDS, FinetuneConfig, finetune
    from .config_flags import composed_settings

    result = finetune(FinetuneConfig.from_settings(**composed_settings(args, FIELDS)))
    return 128 + result.signal if result.signal else 0
