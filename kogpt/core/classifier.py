"""Sequence classification and regression with a GPT: a `score` head on the last non-pad token.

The model is transformers' GPT2ForSequenceClassification / GPTJForSequenceClassification: a
Linear(n_embd, num_labels, bias=False) on the final hidden state (after ln_f) of the rightmost token
that is not the config's pad_token_id. `Head` says what its outputs mean and how its inputs are framed
(kogpt.evaluation.classify frames and predicts; kogpt.hf reads and writes classifier folders).

    clf = Classifier(GPT(config), num_labels=2); logits = clf(idx)  # (B, T) -> (B, 2)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import GPTConfig
from .model import GPT

INPUT_FORMAT = "eos-v1"  # the framing of evaluation.classify.frame: bump when it changes (folders name it)


@dataclass(frozen=True)
class Head:
    """What a classifier's outputs mean and how its inputs are framed."""

    task: str | None  # the benchmark it was finetuned on (None: a folder kogpt did not make)
    labels: tuple[str, ...]  # output names in order; a single output is a 0–5 regression
    seq_len: int = 64  # tokens per framed input, specials included
    input_format: str = INPUT_FORMAT

    @property
    def regression(self) -> bool:
        return len(self.labels) == 1

    @classmethod
    def for_task(cls, task, seq_len: int) -> "Head":
        """STS tasks regress the 0–5 score; the others classify into the task's labels (task: an
        evaluation.tasks.Task, read for its name, scored and choices)."""
        return cls(task.name, ("score",) if task.scored else task.choices, seq_len)


class Classifier(nn.Module):
    """A GPT without its LM head, plus `score` on the last non-pad token: idx (B, T) → (B, num_labels)."""

    def __init__(self, gpt: GPT, num_labels: int):
        super().__init__()
        gpt.lm_head = None  # HF's classifiers have no LM head; the untied GPT-J one would be dead weight
        self.gpt = gpt
        self.score = nn.Linear(gpt.config.n_embd, num_labels, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)  # HF initializer_range

    @property
    def config(self) -> GPTConfig:
        return self.gpt.config

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.gpt.hidden(idx)  # (B, T, C)
        last = last_non_pad(idx, self.config.pad_token_id)  # (B,)
        return self.score(h[torch.arange(len(idx), device=idx.device), last])  # (B, num_labels)


def last_non_pad(idx: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Position (B,) of each row's rightmost token that is not pad_id, as transformers picks it
    (0 for a row of pads; the last position when there is no pad id)."""
    B, T = idx.shape
    if pad_id is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=idx.device)
    pos = torch.arange(T, device=idx.device)
    return (pos * (idx != pad_id)).argmax(-1)
