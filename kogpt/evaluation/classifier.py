"""Sequence classification and regression with a GPT: a `score` head on the last non-pad token.

The head is transformers' GPT2ForSequenceClassification / GPTJForSequenceClassification: a
Linear(n_embd, num_labels, bias=False) on the final hidden state (after ln_f) of the rightmost token
that is not the config's pad_token_id. Inputs follow KoGPT2-subtasks (`</s> text </s>`, pairs
`</s> a </s> b </s>`, with the tokenizer's EOS), right-padded. Saved folders are HF format: transformers
loads them with the same logits; config.json also records the task and input format under `kogpt_finetune`.

    clf, head = load_classifier("runs/nsmc/model"); preds = predict(clf, head, tok, examples)
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from ..hf.checkpoint import (CONFIG_FILE, CheckpointError, assign_weights, meta_model, read_json, read_weights,
                         write_weights)
from ..core.config import GPTConfig
from ..hf.convert import (ConversionError, classifier_config_from_hf, classifier_config_to_hf,
                      classifier_state_dict_from_hf, classifier_state_dict_to_hf, is_classifier_config)
from ..errors import UserError
from ..core.model import GPT
from .tasks import Example, Prediction, Task
from .tasks.korsts import THRESHOLD

INPUT_FORMAT = "eos-v1"  # bump when the framing below changes: results and folders name it
FINETUNE_KEY = "kogpt_finetune"  # config.json: {"task", "input_format", "seq_len", ...}


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
    def for_task(cls, task: Task, seq_len: int) -> "Head":
        """STS tasks regress the 0–5 score; the others classify into the task's labels."""
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


# -- inputs ---------------------------------------------------------------------------------------
def pad_id_for(tokenizer) -> int:
    """The pad id a new classifier gets: the tokenizer's pad token, else its separator (EOS)."""
    sep = separator(tokenizer)
    return tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id != sep else sep


def separator(tokenizer) -> int:
    """The token that opens, separates and closes inputs: EOS (KoGPT2's `</s>`), else BOS."""
    sep = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
    if sep is None:
        raise UserError("the tokenizer has neither an EOS nor a BOS token to frame classifier inputs with")
    return sep


def _fit(a: list[int], b: list[int], room: int) -> tuple[list[int], list[int]]:
    """Cut the longer of a, b (their ends) one token at a time until both fit `room` (longest first)."""
    la, lb = len(a), len(b)
    while la + lb > room:
        if la >= lb:
            la -= 1
        else:
            lb -= 1
    return a[:la], b[:lb]


def frame(tokenizer, examples: Sequence[Example], seq_len: int, pad_id: int | None,
          vocab_size: int | None = None) -> tuple[list[list[int]], list[int]]:
    """(rows of ids, example index of each row): `sep text sep`, or for pairs both `sep a sep b sep`
    and `sep b sep a sep`; texts are cut at the end to fit seq_len. A closing separator equal to
    pad_id is left out (transformers would read it as padding)."""
    sep = separator(tokenizer)
    close = [] if sep == pad_id else [sep]
    if seq_len < 3 + len(close):
        raise UserError(f"--seq-len {seq_len} leaves no room for text between the separators")
    first = tokenizer.encode_batch([e.text for e in examples])
    pairs = any(e.text_pair is not None for e in examples)
    second = tokenizer.encode_batch([e.text_pair or "" for e in examples]) if pairs else None
    rows, owner = [], []
    for i, a in enumerate(first):
        if second is None:
            rows.append([sep, *a[:seq_len - 1 - len(close)], *close])
            owner.append(i)
            continue
        for x, y in ((a, second[i]), (second[i], a)):  # both orders; predictions average them
            x, y = _fit(x, y, seq_len - 2 - len(close))
            rows.append([sep, *x, sep, *y, *close])
            owner.append(i)
    top = max((max(r) for r in rows), default=0)
    if vocab_size is not None and top >= vocab_size:
        raise UserError(f"the tokenizer produced id {top}, past the model's vocabulary of {vocab_size}")
    return rows, owner


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int | None, device=None) -> torch.Tensor:
    """LongTensor (B, T) of the rows right-padded with pad_id to the longest."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), 0 if pad_id is None else pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return ids.to(device)


# -- predicting -----------------------------------------------------------------------------------
@torch.no_grad()
def outputs(model: Classifier, rows: Sequence[Sequence[int]], batch_size: int = 32, autocast=None,
            part: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """The head's outputs (N, num_labels), float32 on CPU, batch_size rows per forward (sorted by length).

    part=(rank, world) computes every world-th batch from rank (the other rows stay 0, to be summed
    over ranks); every rank runs the same number of forwards, as FSDP needs.
    """
    if model.config.pad_token_id is None and batch_size > 1 and len(rows) > 1:
        raise CheckpointError("the classifier's config.json has no pad_token_id: set it to batch inputs")
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    rank, world = part
    out = torch.zeros(len(rows), model.score.out_features)
    for j in range(rank, math.ceil(len(batches) / world) * world, world):
        idx = batches[min(j, len(batches) - 1)]  # past the end: a repeat whose result is dropped
        with autocast or nullcontext():
            y = model(pad_rows([rows[i] for i in idx], model.config.pad_token_id, device)).float().cpu()
        if j < len(batches):
            out[idx] = y
    return out


def to_predictions(head: Head, out: torch.Tensor, owner: Sequence[int], n: int) -> list[Prediction]:
    """One Prediction per example from the outputs of its rows (pairs: the mean of both orders).

    Regression: score = the output, label = score >= 3 (KLUE-STS's binary threshold). Classification:
    label = argmax, logprobs = log-softmax of the logits.
    """
    idx = torch.tensor(owner)
    sums = torch.zeros(n, out.size(1), dtype=torch.float64).index_add_(0, idx, out.double())
    mean = sums / torch.bincount(idx, minlength=n)[:, None]
    if head.regression:
        return [Prediction(int(s >= THRESHOLD), (), s) for s in mean[:, 0].tolist()]
    logp = mean.log_softmax(-1)
    return [Prediction(int(row.argmax()), tuple(row.tolist())) for row in logp]


def predict(model: Classifier, head: Head, tokenizer, examples: Sequence[Example], batch_size: int = 32,
            autocast=None) -> list[Prediction]:
    """Frame, run and read out `examples` with the model's own head (no prompts)."""
    rows, owner = frame(tokenizer, examples, head.seq_len, model.config.pad_token_id, model.config.vocab_size)
    return to_predictions(head, outputs(model, rows, batch_size, autocast), owner, len(examples))


# -- folders ----------------------------------------------------------------------------------------
def is_classifier(folder: str | os.PathLike) -> bool:
    """Whether a model folder holds a sequence classifier (its config.json names one)."""
    path = Path(folder) / CONFIG_FILE
    return path.is_file() and is_classifier_config(read_json(path))


def save_classifier(model: Classifier, head: Head, folder: str | os.PathLike, **info) -> None:
    """config.json + model.safetensors that transformers loads as a *ForSequenceClassification;
    `info` (e.g. best_step, val metrics) joins the task and input format under kogpt_finetune."""
    backbone = {k: v.detach().cpu() for k, v in model.gpt.state_dict().items()}
    hf = classifier_state_dict_to_hf(backbone, model.score.weight.detach().cpu(), model.config)
    problem = "regression" if head.regression else "single_label_classification"
    config = classifier_config_to_hf(model.config, list(head.labels), problem, model.score.weight.dtype)
    config[FINETUNE_KEY] = {"task": head.task, "input_format": head.input_format, "seq_len": head.seq_len, **info}
    write_weights(Path(folder), hf, config)


def build_classifier(config: GPTConfig, state_dict: dict[str, torch.Tensor], device="cpu") -> Classifier:
    """A Classifier holding exactly these tensors (`gpt.*` and `score.weight`), in eval mode."""
    with torch.device("meta"):
        model = Classifier(meta_model(config), state_dict["score.weight"].size(0))
    return assign_weights(model, state_dict).to(device).eval()


def read_head(folder: str | os.PathLike) -> tuple[Head, GPTConfig, list[str], dict]:
    """(Head, backbone config, labels, raw config.json) of a classifier folder, weights unread."""
    folder = Path(folder)
    raw = read_json(folder / CONFIG_FILE)
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
    return head, config, labels, raw


def check_head(head: Head, task: Task, name: str) -> None:
    """UserError unless the head has the task's outputs (its labels, or one 0–5 score for STS)."""
    want = Head.for_task(task, head.seq_len).labels
    if len(head.labels) != len(want):
        raise UserError(f"{name} has a head of {len(head.labels)} output(s) ({', '.join(head.labels)}); "
                        f"{task.name} needs {len(want)} ({', '.join(want)})")


def load_classifier(folder: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> tuple[Classifier, Head]:
    """A classifier folder (kogpt's or any GPT2/GPTJForSequenceClassification) and what its head means."""
    head, config, _, raw = read_head(folder)
    backbone, score = read_weights(Path(folder), raw, lambda get, names, dt: classifier_state_dict_from_hf(
        get, names, config, dt), dtype)
    return build_classifier(config, {**{f"gpt.{k}": v for k, v in backbone.items()}, "score.weight": score},
                            device), head
