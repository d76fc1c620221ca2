"""Classifying text with a finetuned classifier (core.classifier): inputs framed, run in batches, read out.

Inputs follow KoGPT2-subtasks (`</s> text </s>`, pairs `</s> a </s> b </s>` in both orders, with the
tokenizer's EOS), right-padded; predictions average a pair's two orders. The same framing trains the
classifier (training.finetune) and scores it (evaluation.evaluate); core.classifier.INPUT_FORMAT names it.

    clf = load("runs/nsmc/model"); head = read_head("runs/nsmc/model")[0]; preds = predict(clf, head, tok, examples)
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Sequence

import torch

from ..core.classifier import Classifier, Head
from ..errors import UserError
from ..hf.folder import CheckpointError
from .tasks import Example, Prediction, Task
from .tasks.korsts import THRESHOLD


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


def check_head(head: Head, task: Task, name: str) -> None:
    """UserError unless the head has the task's outputs (its labels, or one 0–5 score for STS)."""
    want = Head.for_task(task, head.seq_len).labels
    if len(head.labels) != len(want):
        raise UserError(f"{name} has a head of {len(head.labels)} output(s) ({', '.join(head.labels)}); "
                        f"{task.name} needs {len(want)} ({', '.join(want)})")

