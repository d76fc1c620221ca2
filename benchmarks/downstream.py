"""TF-IDF baseline for the downstream tasks: how much does the language model add?

Character n-gram TF-IDF (scikit-learn) + logistic regression (NSMC, YNAT) or ridge regression on the
0–5 score (KorSTS, KLUE-STS; "similar" = score >= 3), trained on the task's training file. The
regularization is chosen on a validation split carved from the training file (seeded), then the
model is refit on train + validation and scored once on --eval; without --eval a held-out split of
the training file is the evaluation set (NSMC's test file is not offline). Same loaders and metrics
as `kogpt eval`; --compare adds its JSON results to the table.

    python benchmarks/downstream.py --task nsmc --train ../shared/data/bench/nsmc/ratings_train.txt
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge

from kogpt.errors import UserError
from kogpt.evaluation.report import markdown_table
from kogpt.evaluation.tasks import TASKS, Example, Prediction, Task, get_task
from kogpt.evaluation.tasks.base import split_examples as split

GRID = {"logreg": [0.25, 1.0, 4.0, 16.0], "ridge": [0.3, 1.0, 3.0, 10.0]}  # C / alpha
TOO_SMALL = 500  # fewer training rows than this gives no meaningful baseline
NGRAMS = (1, 3)


class Baseline:
    """TF-IDF features and a linear model for one task (pairs: the product and |difference| of the two vectors)."""

    def __init__(self, task: Task, reg: float):
        self.task, self.reg = task, reg
        self.kind = "ridge" if task.scored else "logreg"
        self.tfidf = TfidfVectorizer(analyzer="char_wb", ngram_range=NGRAMS, min_df=2, sublinear_tf=True)

    def features(self, examples: list[Example], fit: bool = False):
        """Sparse feature rows of the examples (fit=True also learns the vocabulary)."""
        if self.task.scored:
            texts = [e.text for e in examples] + [e.text_pair for e in examples]
            v = self.tfidf.fit_transform(texts) if fit else self.tfidf.transform(texts)
            a, b = v[:len(examples)], v[len(examples):]  # rows are L2-normalized: a·b is the cosine
            cos = sp.csr_matrix(np.asarray(a.multiply(b).sum(1)))
            return sp.hstack([a.multiply(b), abs(a - b), cos]).tocsr()
        texts = [e.text for e in examples]
        return self.tfidf.fit_transform(texts) if fit else self.tfidf.transform(texts)

    def fit(self, examples: list[Example]) -> "Baseline":
        x = self.features(examples, fit=True)
        if self.task.scored:
            self.model = Ridge(alpha=self.reg).fit(x, [e.score for e in examples])
        else:
            self.model = LogisticRegression(C=self.reg, max_iter=2000).fit(x, [e.label for e in examples])
        return self

    def predict(self, examples: list[Example]) -> list[Prediction]:
        x = self.features(examples)
        if self.task.scored:
            scores = np.clip(self.model.predict(x), 0.0, 5.0)
            return [Prediction(int(s >= 3.0), (), float(s)) for s in scores]
        return [Prediction(int(y), ()) for y in self.model.predict(x)]

    def name(self) -> str:
        param = "alpha" if self.task.scored else "C"
        return f"tfidf-char{NGRAMS[0]}-{NGRAMS[1]}+{self.kind}({param}={self.reg:g})"


def write_split(path: Path, parts: dict[str, list[Example]], out: Path) -> None:
    """Write each part as OUT/<part><suffix>: the file's header line, then the part's rows verbatim, in the
    split's order (so `--train OUT/train --eval OUT/heldout` reproduces this run and `kogpt finetune` and
    `kogpt eval` can use exactly the same rows)."""
    if path.suffix == ".json":
        raise UserError(f"{path}: --write-split copies rows of line-based (TSV) files; JSON tasks are not supported")
    targets = [out / f"{name}{path.suffix}" for name in parts]
    if any(t.resolve() == path.resolve() for t in targets):
        raise UserError(f"--write-split {out} would overwrite the input {path}; choose another folder")
    lines = path.read_bytes().split(b"\n")
    out.mkdir(parents=True, exist_ok=True)
    for examples, target in zip(parts.values(), targets):
        rows = [lines[int(e.where.rsplit(":", 1)[1]) - 1].removesuffix(b"\r") for e in examples]
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(b"\n".join([lines[0].removesuffix(b"\r"), *rows]) + b"\n")
        tmp.replace(target)
        print(f"wrote {len(rows)} rows to {target}", file=sys.stderr)


def run(args: argparse.Namespace) -> dict:
    """Pick the regularization on validation, refit, and score the evaluation set once: a result dict."""
    task = get_task(args.task)
    train_task = get_task(args.train_task or args.task)
    if (train_task.scored, train_task.choices) != (task.scored, task.choices):
        raise UserError(f"--train-task {train_task.name} does not have {task.name}'s labels")
    train = train_task.load(args.train)
    if args.eval:
        test, where = task.load(args.eval), str(args.eval)
    else:
        train, test = split(train, args.holdout_fraction, args.seed)
        where = f"held-out {args.holdout_fraction:.0%} of {args.train} (seed {args.seed})"
        if args.write_split:
            write_split(args.train, {"train": train, "heldout": test}, args.write_split)
    if len(train) < TOO_SMALL:
        print(f"warning: {len(train)} training rows; too few for a meaningful baseline", file=sys.stderr)
    fit_part, val = split(train, args.val_fraction, args.seed + 1)
    primary = None
    best = (-np.inf, None)
    for reg in GRID["ridge" if task.scored else "logreg"]:
        t0 = time.time()
        m = Baseline(task, reg).fit(fit_part)
        metrics = task.metrics(val, m.predict(val))
        primary = primary or next(iter(metrics))
        print(f"  {m.name()}: validation {primary} {metrics[primary]:.4f} ({time.time() - t0:.0f} s)", file=sys.stderr)
        if metrics[primary] > best[0]:
            best = (metrics[primary], reg)
    model = Baseline(task, best[1]).fit(train)  # train + validation
    return {"model": model.name(), "task": task.name, "n": len(test), "train": str(args.train),
            "train_rows": len(train), "eval": where, "metrics": task.metrics(test, model.predict(test))}


def main(argv: list[str] | None = None) -> int:
    """Command line entry: print the table (and write JSON); 2 on bad input."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--train", required=True, type=Path, help="the task's training file")
    p.add_argument("--train-task", choices=list(TASKS),
                   help="read --train as this task's format (e.g. korsts for klue-sts: same labels)")
    p.add_argument("--eval", type=Path, help="evaluation file (default: a held-out split of --train)")
    p.add_argument("--holdout-fraction", type=float, default=0.2, help="held-out share without --eval")
    p.add_argument("--write-split", type=Path, metavar="DIR",
                   help="without --eval: also write the split as DIR/train.EXT and DIR/heldout.EXT (rows verbatim)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share of the training rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", type=Path, nargs="*", default=[], help="`kogpt eval --output` JSON files to list too")
    p.add_argument("--output", type=Path, help="write the baseline result as JSON")
    args = p.parse_args(argv)
    if args.write_split and args.eval:
        p.error("--write-split writes the held-out split; it cannot be combined with --eval")
    for name in ("holdout_fraction", "val_fraction"):
        if not 0 < getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be in (0, 1)")
    try:
        result = run(args)
        others = [json.loads(f.read_text(encoding="utf-8")) for f in args.compare]
    except (UserError, OSError) as e:
        print(f"downstream: error: {e}", file=sys.stderr)
        return 2
    print(f"{result['task']}: trained on {result['train_rows']} rows of {result['train']}; evaluated on {result['eval']}")
    print(markdown_table([result, *others]))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
