"""LoRA training runs: the frozen bf16 base with fp32 adapters that `--lora-r` asks for, and the PEFT
adapter folder such a run writes instead of a full model.

The base comes through the one loader with a LoRA layout (core/layout.py), so only A and B (and a
classifier's score head) are fp32 and trainable; everything else is frozen bf16 and stays out of the
optimizer. Used by pretrain.LMObjective (--init-from) and finetune.ClassifierObjective.

    model = load_lora_base(folder, cfg, device)  # None of cfg.lora_r == 0
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.layout import Layout
from ..core.lora import LoRAConfig
from ..hf.load import load
from .config import TrainConfig


def lora_config(cfg: TrainConfig) -> LoRAConfig | None:
    """The adapters cfg asks for (None: full training)."""
    if not cfg.lora_r:
        return None
    return LoRAConfig.parse(cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)


def load_lora_base(folder: Path, cfg: TrainConfig, device) -> torch.nn.Module:
    """The model of `folder` with bf16 weights, all frozen, and fresh fp32 adapters on cfg's targets."""
    model = load(folder, Layout(torch.bfloat16, lora=lora_config(cfg)), device)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith((".lora_A", ".lora_B")))
    return model
