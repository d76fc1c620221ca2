"""NSMC (Naver Sentiment Movie Corpus): is a movie review positive or negative?

File: TSV `id document label` (0 negative, 1 positive) with a header, read with quoting off (a
quote is part of the review). Empty documents (5 in ratings_train.txt) are kept as "": they are
real rated rows, and keeping them keeps n equal to the file's rows (150,000 / 50,000), so results
stay comparable with every published number. Prompt nsmc-v1 scores " 긍정" / " 부정" after
"리뷰: {text}\\n감정:". Metrics: accuracy and macro-F1.
"""

from __future__ import annotations

import os
from typing import Sequence

from ..metrics import accuracy, macro_f1
from .base import Example, Prediction, Task, nonempty, parse_int, read_tsv

HEADER = ("id", "document", "label")


def load(path: str | os.PathLike) -> list[Example]:
    """Every row of an NSMC file (ratings_train.txt / ratings_test.txt)."""
    return nonempty([Example(id=f[0], text=f[1], label=parse_int(f[2], where, "label", (0, 1)), where=where)
                     for where, f in read_tsv(path, HEADER)], path)


def metrics(examples: Sequence[Example], preds: Sequence[Prediction]) -> dict[str, float]:
    """Accuracy and macro-F1 of the predicted labels."""
    gold, pred = [e.label for e in examples], [p.label for p in preds]
    return {"accuracy": accuracy(gold, pred), "macro_f1": macro_f1(gold, pred)}


TASK = Task(name="nsmc", prompt_version="nsmc-v1", template="리뷰: {text}\n감정:", choices=("부정", "긍정"),
            load=load, metrics=metrics)
