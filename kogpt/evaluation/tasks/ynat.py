"""KLUE-YNAT: the topic of a Yonhap news headline, one of 7.

File: TSV `guid title label label_text label_source` with a header (ynat-v1.1_train.tsv / _dev.tsv).
Labels 0–6 are IT과학 경제 사회 생활문화 세계 스포츠 정치 and label_text must name the same topic;
rows with label -1 (unlabelled, 747 in the train file) are dropped by design. Prompt ynat-v1 asks
"다음의 제목을 가지는 뉴스는 어느 분야의 뉴스인가요?" and scores each topic word. Metric: macro-F1.
"""

from __future__ import annotations

import os
from typing import Sequence

from ...errors import UserError
from ..metrics import accuracy, macro_f1
from .base import Example, Prediction, Task, nonempty, parse_int, read_tsv

HEADER = ("guid", "title", "label", "label_text", "label_source")
TOPICS = ("IT과학", "경제", "사회", "생활문화", "세계", "스포츠", "정치")


def load(path: str | os.PathLike) -> list[Example]:
    """The labelled rows of a KLUE-YNAT TSV (label -1 rows are skipped)."""
    out = []
    for where, (guid, title, label, label_text, _) in read_tsv(path, HEADER):
        y = parse_int(label, where, "label", range(-1, len(TOPICS)))
        if y == -1:
            continue
        if label_text != TOPICS[y]:
            raise UserError(f"{where}: label {y} is {TOPICS[y]}, but label_text says {label_text!r}")
        out.append(Example(id=guid, text=title, label=y, where=where))
    return nonempty(out, path)


def metrics(examples: Sequence[Example], preds: Sequence[Prediction]) -> dict[str, float]:
    """Macro-F1 (the KLUE metric) and accuracy of the predicted topics."""
    gold, pred = [e.label for e in examples], [p.label for p in preds]
    return {"macro_f1": macro_f1(gold, pred), "accuracy": accuracy(gold, pred)}


TASK = Task(name="ynat", prompt_version="ynat-v1",
            template="다음의 제목을 가지는 뉴스는 어느 분야의 뉴스인가요?\n제목: {text}\n분야:",
            choices=TOPICS, load=load, metrics=metrics)
