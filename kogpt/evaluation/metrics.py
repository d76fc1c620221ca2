"""Evaluation metrics as small pure functions over Python sequences (no numpy, no scipy).

Accuracy, F1 of one class, macro-F1 (unweighted mean over the classes that occur in gold or
predictions, as scikit-learn's f1_score(average="macro")), Pearson and Spearman correlation
(average ranks for ties, as scipy.stats.spearmanr). Scores are fractions in [0, 1], not percent.

    macro_f1([0, 1, 1], [0, 1, 0])  # 0.666...
"""

from __future__ import annotations

import math
from typing import Hashable, Sequence


def _check(gold: Sequence, pred: Sequence) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        raise ValueError("no examples to score")


def accuracy(gold: Sequence[Hashable], pred: Sequence[Hashable]) -> float:
    """Fraction of predictions equal to the gold label."""
    _check(gold, pred)
    return sum(g == p for g, p in zip(gold, pred)) / len(gold)


def f1(gold: Sequence[Hashable], pred: Sequence[Hashable], positive: Hashable = 1) -> float:
    """F1 of the `positive` class (0 when it is neither predicted nor gold: no true positives)."""
    _check(gold, pred)
    tp = sum(g == positive and p == positive for g, p in zip(gold, pred))
    n_pred = sum(p == positive for p in pred)
    n_gold = sum(g == positive for g in gold)
    return 2 * tp / (n_pred + n_gold) if n_pred + n_gold else 0.0


def macro_f1(gold: Sequence[Hashable], pred: Sequence[Hashable]) -> float:
    """Unweighted mean of the per-class F1 over every class seen in gold or pred."""
    _check(gold, pred)
    classes = set(gold) | set(pred)
    return sum(f1(gold, pred, c) for c in classes) / len(classes)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; nan when either side is constant (as scipy)."""
    _check(x, y)
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def ranks(x: Sequence[float]) -> list[float]:
    """1-based ranks of x, ties sharing their average rank."""
    order = sorted(range(len(x)), key=x.__getitem__)
    out = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson of the (tie-averaged) ranks."""
    _check(x, y)
    return pearson(ranks(x), ranks(y))
