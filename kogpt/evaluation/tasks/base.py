"""What every benchmark task is made of: Example, Prediction and Task, and the strict file readers.

A Task is a loader for the real file format, a versioned Korean prompt whose answer is one of a
fixed list of label words (scored by log-likelihood, never sampled), and the task's metrics.
Readers never drop a row silently: a malformed row is a UserError naming `file:line` (JSON lists:
the line where the entry starts); loaders that drop rows by design (YNAT's label -1) document it.

    examples = get_task("nsmc").load("ratings_test.txt")
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ...errors import UserError

SEPARATOR = "\n\n"  # between the blocks (shots, then the query) of a few-shot prompt


@dataclass(frozen=True)
class Example:
    """One row of a benchmark file."""

    id: str
    text: str
    label: int  # class index: Task.choices[label] is the answer word
    text_pair: str | None = None  # second sentence of a pair task
    score: float | None = None  # gold similarity 0–5 of the STS tasks
    where: str = ""  # "file:line" it was read from


@dataclass(frozen=True)
class Prediction:
    """What a model (or a baseline) says about one Example."""

    label: int  # argmax of the choice log-likelihoods
    logprobs: tuple[float, ...]  # sum of log p(label tokens | prompt) per choice, nats
    score: float | None = None  # predicted similarity 0–5 (tasks with scored=True)


@dataclass(frozen=True)
class Task:
    """A benchmark: its loader, its versioned prompt and label words, its metrics."""

    name: str
    prompt_version: str  # bump whenever template or choices change: results name it
    template: str  # str.format with {text} (and {text_pair}); the answer follows after one space
    choices: tuple[str, ...]  # label words, index = Example.label
    load: Callable[[str | os.PathLike], list[Example]]
    metrics: Callable[[Sequence[Example], Sequence[Prediction]], dict[str, float]]
    scored: bool = False  # also predict a 0–5 score: 5 × P(choices[1]) renormalized over the choices

    def render(self, ex: Example, answer: bool) -> str:
        """One block of the prompt; with answer=True it ends with the gold label word."""
        block = self.template.format(text=ex.text, text_pair=ex.text_pair)
        return f"{block} {self.choices[ex.label]}" if answer else block

    def prompt(self, ex: Example, shots: Sequence[Example] = ()) -> str:
        """The shots, answered, then `ex` unanswered, separated by blank lines."""
        return SEPARATOR.join([*(self.render(s, True) for s in shots), self.render(ex, False)])

    def continuations(self) -> list[str]:
        """The text scored after the prompt for each choice."""
        return [f" {c}" for c in self.choices]

    def predict(self, logprobs: Sequence[float]) -> Prediction:
        """Prediction from the per-choice log-likelihoods."""
        label = max(range(len(logprobs)), key=logprobs.__getitem__)
        score = None
        if self.scored:
            top = max(logprobs)
            p = [math.exp(x - top) for x in logprobs]
            score = 5.0 * p[1] / sum(p)
        return Prediction(label, tuple(float(x) for x in logprobs), score)


# -- readers --------------------------------------------------------------------------------------
def _check_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    return path


def read_tsv(path: str | os.PathLike, header: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    """("file:line", fields) of each data row of a tab-separated file with exactly `header`.

    Quoting is off (a quote is text, as in pandas quoting=3): every line is split on tabs alone and
    must have len(header) fields. Lines end at "\\n" only; a trailing "\\r" is removed.
    """
    path = _check_file(path)
    want = "\\t".join(header)
    seen_header = False
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
            except UnicodeDecodeError:
                raise UserError(f"{where}: not UTF-8 text") from None
            fields = line.split("\t")
            if n == 1:
                if [fields[0].removeprefix("\ufeff"), *fields[1:]] != list(header):
                    raise UserError(f"{where}: expected the header {want!r}, found {line[:80]!r}")
                seen_header = True
                continue
            if len(fields) != len(header):
                raise UserError(f"{where}: expected {len(header)} tab-separated fields ({', '.join(header)}), "
                                f"found {len(fields)}")
            yield where, fields
    if not seen_header:
        raise UserError(f"{path}: empty file; expected the header {want!r}")


_WS = re.compile(r"\s*")


def read_json_list(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """("file:line", entry) of each entry of a file holding one JSON list; line = where the entry starts."""
    path = _check_file(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    decoder, line, counted = json.JSONDecoder(), 1, 0

    def at(i: int) -> str:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return f"{path}:{line}"

    i = _WS.match(text).end()
    if text[i:i + 1] != "[":
        raise UserError(f"{at(i)}: expected a JSON list of examples")
    i = _WS.match(text, i + 1).end()
    if text[i:i + 1] == "]":
        i = _WS.match(text, i + 1).end()
    else:
        while True:
            where = at(i)
            try:
                entry, i = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
            yield where, entry
            i = _WS.match(text, i).end()
            sep = text[i:i + 1]
            i = _WS.match(text, i + 1).end()
            if sep == "]":
                break
            if sep != ",":
                raise UserError(f"{at(i)}: invalid JSON (expected ',' or ']' after an entry)")
    if i < len(text):
        raise UserError(f"{at(i)}: invalid JSON (extra data after the list)")


def parse_int(value: str, where: str, name: str, allowed: Sequence[int]) -> int:
    """int(value) when it is one of `allowed`, else a UserError naming the field."""
    try:
        v = int(value)
    except (TypeError, ValueError):
        v = None
    if v not in allowed:
        raise UserError(f"{where}: {name} must be one of {', '.join(map(str, allowed))}, found {value!r}")
    return v


def parse_score(value: object, where: str, name: str) -> float:
    """A similarity score in [0, 5] (a number, or a string holding one)."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(value, bool) or not 0.0 <= v <= 5.0:
        raise UserError(f"{where}: {name} must be a number in [0, 5], found {value!r}")
    return v


def split_examples(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(rest, carved): a seeded random `fraction` of the examples (at least one) carved out."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(examples))
    n = max(1, round(len(examples) * fraction))
    return [examples[i] for i in order[n:]], [examples[i] for i in order[:n]]


def nonempty(examples: list[Example], path: str | os.PathLike) -> list[Example]:
    """`examples`, or a UserError when the file held none."""
    if not examples:
        raise UserError(f"{path}: no examples")
    return examples
