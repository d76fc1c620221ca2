"""`kogpt train`: pretrain (or continue pretraining) a GPT on data from `kogpt prepare`.

Every TrainConfig field is a flag (config_flags builds it from the field's own help) and a TOML key of --config;
flags win over the file. Under `torchrun --nproc_per_node N -m kogpt train ...` it runs DDP.
An --out that holds an earlier run is refused unless --resume or --overwrite says what to do with it.
"""

from __future__ import annotations

import argparse

NAME = "train"
HELP = "train a Korean GPT on prepared data (TOML config, every key overridable by a flag; torchrun for DDP)"
EPILOG = """examples:
  kogpt train --data data --out runs/tiny --preset tiny --max-steps 300
  kogpt train --config pretrain.toml --lr 3e-4 --resume
  kogpt train --data data --out runs/tiny --preset tiny --overwrite   # delete runs/tiny's earlier run, start over
  torchrun --nproc_per_node 2 -m kogpt train --config pretrain.toml --grad-accum 4
"""


# `kogpt train --help`, group by group: every TrainConfig field once
GROUPS = {
    "data, model and run folder": "data out preset init_from n_layer n_embd n_head resume overwrite",
    "batch: a step sees batch_size × grad_accum sequences of seq_len tokens, on any number of processes":
        "batch_size grad_accum seq_len max_steps",
    "optimizer and schedule": "lr min_lr warmup_steps weight_decay dropout beta1 beta2 grad_clip weights",
    "validation, logging and checkpoints": "eval_every eval_batches sample_prompt sample_tokens log_every save_every "
                                           "keep_last",
    "LoRA (with --init-from): adapters on a frozen bf16 base": "lora_r lora_alpha lora_dropout lora_targets",
    "runtime": "seed dtype device compile fsdp grad_checkpoint peak_flops progress",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..training.config import FIELDS
    from .config_flags import add_config_flags

    p.epilog, p.formatter_class = EPILOG, argparse.RawDescriptionHelpFormatter
    p.add_argument("--config", metavar="FILE.toml", help="TOML file of settings (keys as the flags, with _ for -)")
    add_config_flags(p, GROUPS, FIELDS)


def run(args: argparse.Namespace) -> int:
    from ..training.config import FIELDS, read_train_config
    from ..training.loop import train
    from .config_flags import given
    from .prepare import parse_weights

    overrides = given(args, FIELDS)
    if "weights" in overrides:
        overrides["weights"] = parse_weights(overrides["weights"])
    result = train(read_train_config(args.config, overrides))
    return 128 + result.signal if result.signal else 0
