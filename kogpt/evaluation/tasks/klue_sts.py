"""KLUE-STS: are two sentences similar? Scored as F1 on the binary label, as KLUE and KoGPT report it.

File: the KLUE JSON list (klue-sts-v1.1_dev.json; a 20-entry format sample ships in ../shared),
entries `guid, source, sentence1, sentence2, labels{label (0–5), real-label, binary-label}`.
Prompt sts-v1 is KorSTS's yes/no question (see korsts.py): the predicted label is the likelier of
" 예" / " 아니오". Metrics: F1 of the similar class (binary-label 1), plus Pearson of the 0–5 score.
"""

from __future__ import annotations

import os
from typing import Sequence

from ...errors import UserError
from ..metrics import f1, pearson
from .base import Example, Prediction, Task, nonempty, parse_int, parse_score, read_json_list
from .korsts import STS_CHOICES, STS_TEMPLATE, STS_VERSION


def load(path: str | os.PathLike) -> list[Example]:
    """Every entry of a KLUE-STS JSON file."""
    out = []
    for where, entry in read_json_list(path):
        try:
            guid, s1, s2, labels = entry["guid"], entry["sentence1"], entry["sentence2"], entry["labels"]
            score, binary = labels["label"], labels["binary-label"]
        except (KeyError, TypeError) as e:
            raise UserError(f"{where}: entry lacks {e} (needs guid, sentence1, sentence2, "
                            "labels{label, binary-label})") from None
        if not all(isinstance(s, str) for s in (guid, s1, s2)):
            raise UserError(f"{where}: guid, sentence1 and sentence2 must be strings")
        out.append(Example(id=guid, text=s1, text_pair=s2, label=parse_int(binary, where, "binary-label", (0, 1)),
                           score=parse_score(score, where, "labels.label"), where=where))
    return nonempty(out, path)


def metrics(examples: Sequence[Example], preds: Sequence[Prediction]) -> dict[str, float]:
    """F1 of the similar class on the binary label, and Pearson of the 0–5 scores."""
    return {"f1": f1([e.label for e in examples], [p.label for p in preds]),
            "pearson": pearson([e.score for e in examples], [p.score for p in preds])}


TASK = Task(name="klue-sts", prompt_version=STS_VERSION, template=STS_TEMPLATE, choices=STS_CHOICES,
            load=load, metrics=metrics, scored=True)
