"""Writing HF model folders that transformers loads: a GPT as GPT2LMHeadModel / GPTJForCausalLM, a
Classifier as *ForSequenceClassification with its Head (labels, task, input format) in config.json.
Every file is written atomically (kogpt.fileio).

    save_model(model, folder); write_model(state_dict, config, folder, head)  # a training run's export
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.classifier import Classifier, Head
from ..core.config import GPTConfig
from ..core.model import GPT
from ..fileio import atomic_write, write_json
from .convert import classifier_config_to_hf, config_to_hf, state_dict_to_hf
from .folder import CONFIG_FILE, FINETUNE_KEY, CheckpointError
from .weights import SAFETENSORS_FILE


def save_model(model: GPT | Classifier, folder: str | os.PathLike, head: Head | None = None, **info) -> None:
    """config.json and model.safetensors of a GPT, or of a Classifier and what its `head` means."""
    write_model(model.state_dict(), model.config, folder, head, **info)


def write_model(state_dict: dict[str, torch.Tensor], config: GPTConfig, folder: str | os.PathLike,
                head: Head | None = None, **info) -> None:
    """The HF folder of a GPT's state dict, or with `head` of a Classifier's (`gpt.*`, `score.weight`);
    `info` (e.g. best_step, val metrics) joins the head's task and input format under kogpt_finetune."""
    sd = {k: v.detach().cpu() for k, v in state_dict.items()}
    if any(k.endswith("qweight") for k in sd):
        raise CheckpointError("an int8- or int4-quantized model cannot be saved in HF format; save the float model")
    if head is None:
        hf = config_to_hf(config, sd["wte.weight"].dtype)
    else:
        problem = "regression" if head.regression else "single_label_classification"
        hf = classifier_config_to_hf(config, list(head.labels), problem, sd["score.weight"].dtype)
        hf[FINETUNE_KEY] = {"task": head.task, "input_format": head.input_format, "seq_len": head.seq_len, **info}
    tensors = state_dict_to_hf(sd, config, classifier=head is not None)
    folder = Path(folder)
    atomic_write(folder / SAFETENSORS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write_json(folder / CONFIG_FILE, hf)
