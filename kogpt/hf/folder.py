"""What an HF model folder's config.json says: the model's GPTConfig, its finetuning dropout, and for a
sequence classifier (*ForSequenceClassification) its Head: labels, task and input framing.

CheckpointError is the one error for a model folder that cannot be found or read; its message names
the file and what to do.

    config = load_config(folder); head, config = read_head(classifier_folder)
"""

from __future__ import annotations

import os
from pathlib import Path

from ..core.classifier import INPUT_FORMAT, Head
from ..core.config import GPTConfig
from ..errors import UserError
from ..fileio import FileFormatError
from ..fileio import read_json as _read_json
from .convert import ConversionError, classifier_config_from_hf, config_from_hf, dropout_from_hf, is_classifier_config

CONFIG_FILE = "config.json"
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter folder's config (hf/peft.py)
FINETUNE_KEY = "kogpt_finetune"  # a classifier's config.json: {"task", "input_format", "seq_len", ...}


class CheckpointError(UserError):
    """A model cannot be found or read; the message names the file and what to do."""


def read_json(path: Path) -> dict:
    """kogpt.fileio.read_json, failing with a CheckpointError (the same message) for model folders."""
    try:
        return _read_json(path)
    except FileFormatError as e:
        raise CheckpointError(str(e)) from None


def load_config(folder: str | os.PathLike, raw: dict | None = None) -> GPTConfig:
    """GPTConfig of a model folder (from its config.json, or `raw` already read from it)."""
    path = Path(folder) / CONFIG_FILE
    try:
        return config_from_hf(read_json(path) if raw is None else raw)
    except (ConversionError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_dropout(folder: str | os.PathLike) -> float:
    """The training dropout a model folder's config.json sets, as transformers would read it."""
    return dropout_from_hf(read_json(Path(folder) / CONFIG_FILE))


def is_classifier(folder: str | os.PathLike) -> bool:
    """Whether a model folder holds a sequence classifier (its config.json names one)."""
    path = Path(folder) / CONFIG_FILE
    return path.is_file() and is_classifier_config(read_json(path))


def require_language_model(folder: str | os.PathLike, name: str, use: str) -> None:
    """CheckpointError when `folder` holds a finetuned classifier where a language model is needed (`use`)."""
    if is_classifier(folder):
        raise CheckpointError(f"{name} is a finetuned classifier: it has no language-model head to {use}")


def read_head(folder: str | os.PathLike, raw: dict | None = None) -> tuple[Head, GPTConfig]:
    """(Head, backbone config) of a classifier folder (from its config.json, or `raw` already read from it)."""
    folder = Path(folder)
    raw = read_json(folder / CONFIG_FILE) if raw is None else raw
    try:
        config, labels, _ = classifier_config_from_hf(raw)
    except (ConversionError, ValueError, TypeError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {e}") from None
    info = raw.get(FINETUNE_KEY) or {}
    head = Head(info.get("task"), tuple(labels), int(info.get("seq_len") or config.n_positions),
                info.get("input_format", INPUT_FORMAT))
    if head.input_format != INPUT_FORMAT:
        raise CheckpointError(f"{folder}: input format {head.input_format!r} is not {INPUT_FORMAT!r}: "
                              f"upgrade kogpt to use this model")
    return head, config
