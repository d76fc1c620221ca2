"""Evaluating a finetuned classifier on a benchmark task with its own head: no prompts, no shots.

The result has the same shape as a few-shot one (fewshot.py), so `kogpt eval` prints and saves both
alike; the forward pass and the head check live with the classifier (classify.py).

    result = evaluate_finetuned(model, head, tokenizer, get_task("nsmc"), examples)
"""

from __future__ import annotations

from typing import Sequence

from .. import __version__
from .classify import check_head, predict
from .tasks import Example, Task


def evaluate_finetuned(model, head, tokenizer, task: Task, examples: Sequence[Example], *, batch_size: int = 32,
                       name: str = "kogpt") -> dict:
    """`examples` classified (or scored 0–5) by a finetuned classifier's own head: no prompts, no shots.

    The head must have the task's outputs (its labels, or one score for the STS tasks); a KorSTS
    model can score KLUE-STS and back. Pairs are read in both orders and averaged, as in training.
    """
    check_head(head, task, name)
    preds = predict(model, head, tokenizer, examples, batch_size)
    records = []
    for ex, p in zip(examples, preds):
        rec = {"id": ex.id, "gold": ex.label, "pred": p.label}
        if head.regression:
            rec.update(gold_score=ex.score, pred_score=p.score)
        else:
            rec["logprobs"] = list(p.logprobs)
        records.append(rec)
    return {"model": name, "task": task.name, "method": "finetuned", "prompt_version": None,
            "input_format": head.input_format, "finetuned_on": head.task, "labels": list(head.labels),
            "kogpt_version": __version__, "seed": None, "shots": 0, "n": len(examples), "seq_len": head.seq_len,
            "metrics": task.metrics(examples, preds), "predictions": records}
