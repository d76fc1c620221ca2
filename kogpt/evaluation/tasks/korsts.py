"""KorSTS: how similar are two sentences, 0 (unrelated) to 5 (same meaning)?

File: TSV `genre filename year id score sentence1 sentence2` with a header, quoting off
(sts-train.tsv / sts-dev.tsv / sts-test.tsv). Prompt sts-v1 (shared with KLUE-STS) asks whether the
two sentences mean about the same and scores " 예" / " 아니오"; the predicted score is
5 × P(예) renormalized over the two answers. A shot's answer is 예 when its score ≥ 3 (KLUE's binary
threshold). Metrics: Spearman and Pearson correlation with the gold score.
"""

from __future__ import annotations

import os
from typing import Sequence

from ..metrics import pearson, spearman
from .base import Example, Prediction, Task, nonempty, parse_score, read_tsv

HEADER = ("genre", "filename", "year", "id", "score", "sentence1", "sentence2")
THRESHOLD = 3.0  # score >= 3 is "similar" (KLUE-STS binary-label)
STS_VERSION = "sts-v1"
STS_TEMPLATE = "문장 1: {text}\n문장 2: {text_pair}\n질문: 두 문장의 의미가 비슷한가요?\n답:"
STS_CHOICES = ("아니오", "예")  # index = binary label


def load(path: str | os.PathLike) -> list[Example]:
    """Every row of a KorSTS file; label = 1 when score >= 3."""
    out = []
    for where, (genre, filename, year, id_, score, s1, s2) in read_tsv(path, HEADER):
        y = parse_score(score, where, "score")
        out.append(Example(id=f"{genre}/{filename}/{year}/{id_}", text=s1, text_pair=s2,
                           label=int(y >= THRESHOLD), score=y, where=where))
    return nonempty(out, path)


def metrics(examples: Sequence[Example], preds: Sequence[Prediction]) -> dict[str, float]:
    """Spearman and Pearson correlation of the predicted scores with the gold scores."""
    gold, pred = [e.score for e in examples], [p.score for p in preds]
    return {"spearman": spearman(gold, pred), "pearson": pearson(gold, pred)}


TASK = Task(name="korsts", prompt_version=STS_VERSION, template=STS_TEMPLATE, choices=STS_CHOICES,
            load=load, metrics=metrics, scored=True)
