"""`kogpt sft`: instruction (chat) tuning of a GPT on conversations, with the chat template `kogpt serve` uses.

Every SFTConfig field is a flag, and so are the settings of the training loop it holds (TrainConfig fields,
spelled and checked as in `kogpt train`). Runs on the pretraining loop (bf16, progress bar, loss plot,
atomic checkpoints, --resume, torchrun); the best validation checkpoint (answer loss) is written to
OUT/model in HF format, which `kogpt generate --model OUT/model` and `kogpt serve` run.
"""

from __future__ import annotations

import argparse

NAME = "sft"
HELP = "instruction/chat-tune a GPT on conversations (JSONL messages or prompt/completion, or a Q,A CSV)"
EPILOG = """examples:
  kogpt sft --model kogpt-mini --train chat.jsonl --out runs/sft
  kogpt sft --model kogpt-mini --train ChatbotData.csv --out runs/chatbot --max-steps 200 --lr 2e-4
  kogpt sft --model DIR --train train.jsonl --val val.jsonl --out runs/sft --skip-bad-rows --resume
  kogpt serve --model runs/sft/model
"""


# `kogpt sft --help`, group by group: SFTConfig's own settings and those of its loop (TrainConfig)
GROUPS = {
    "what to tune, on what": "model revision train val val_fraction chat_template skip_bad_rows limit out",
    "batch and schedule": "epochs max_steps batch_size grad_accum seq_len lr min_lr warmup weight_decay dropout",
    "validation, logging and checkpoints": "eval_every sample_prompt sample_tokens save_every keep_last log_every "
                                           "resume overwrite",
    "LoRA: adapters on a frozen bf16 base (a PEFT adapter folder instead of a model)":
        "lora_r lora_alpha lora_dropout lora_targets",
    "runtime": "seed dtype device compile fsdp grad_checkpoint peak_flops progress",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..training.sft import FIELDS, LOOP_HELP, SFTConfig
    from .config_flags import add_composed_flags

    add_composed_flags(p, GROUPS, FIELDS, SFTConfig(), LOOP_HELP, EPILOG)


def run(args: argparse.Namespace) -> int:
    import os

    # conversations of every length make bf16 matmuls of ever new shapes, and oneDNN caches a primitive per shape
    # (1,024 by default): measured on kogpt-mini, RSS grew from 0.5 to 1.7 GB in 80 steps; 16 holds it at 1.05 GB,
    # at the same speed. Read when the first matmul runs.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
    from ..training.sft import FIELDS, SFTConfig, sft
    from .config_flags import composed_settings

    result = sft(SFTConfig.from_settings(**composed_settings(args, FIELDS)))
    return 128 + result.signal if result.signal else 0
