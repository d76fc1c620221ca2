"""Reading a Korean corpus: sources, documents, deduplication and the held-out split.

A source is a named group of files (a sub-folder of an input folder, a file, or `NAME=GLOB`). Text
files hold a paragraph per line and a blank line ends a document; a file without any blank line
holds one document per line (e.g. one review per line); a CSV with Q,A columns is Q/A documents.
Text is NFC-normalized, exact duplicate lines are dropped, and every source keeps a held-out slice
for validation. `kogpt prepare` (data.py) tokenizes what this yields; `kogpt train-tokenizer` and
`kogpt eval --task perplexity` read text through it too.

    sources = find_sources(["../shared/data/corpus"]); info = scan(sources[0].files[0])
"""

from __future__ import annotations

import csv
import glob
import math
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from tqdm.auto import tqdm

from ..errors import UserError

TEXT_SUFFIXES = (".txt", ".text", ".csv")
_CSV_FIELD_LIMIT = 1 << 30  # characters in one CSV field (Python's default, 128 Ki, is one long answer)


class DataError(UserError):
    """The corpus or a prepared data folder cannot be used; the message names the file."""


# -- sources ------------------------------------------------------------------------------------
@dataclass
class Source:
    name: str
    files: list[Path] = field(default_factory=list)


def find_sources(inputs: Iterable[str]) -> list[Source]:
    """Sources from `--input` entries: FILE, DIR (each sub-folder and top-level file is a source),
    GLOB, or NAME=FILE|DIR|GLOB (everything it names is one source). Same names merge."""
    by_name: dict[str, Source] = {}

    def add(name: str, files: Iterable[Path]):
        src = by_name.setdefault(name, Source(name))
        src.files.extend(f for f in files if f not in src.files)

    for spec in inputs:
        name, _, pattern = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern))) or [Path(pattern)]
        for path in paths:
            if not path.exists():
                raise DataError(f"input not found: {pattern}")
            if path.is_file():
                add(name or path.stem, [path])
                continue
            for child in sorted(path.iterdir()):
                if child.is_dir():
                    add(name or child.name, _text_files(child))
                elif child.suffix in TEXT_SUFFIXES:
                    add(name or child.stem, [child])
    sources = [s for s in by_name.values() if s.files]
    if not sources:
        raise DataError(f"no text files ({', '.join(TEXT_SUFFIXES)}) in {' '.join(inputs) or 'the inputs'}")
    return sources


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


@dataclass
class FileInfo:
    path: Path
    size: int  # bytes
    one_doc_per_line: bool
    has_text: bool


def _csv_rows(f, path: Path, reader=csv.reader) -> Iterator:
    """The rows of an open CSV file; a malformed row is a DataError naming path:line."""
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)  # process-wide, only ever raised
    rows = reader(f)
    try:
        yield from rows
    except csv.Error as e:
        raise DataError(f"{path}:{rows.line_num}: unreadable CSV ({e})") from None


def scan(path: Path) -> FileInfo:
    """Check that a file is readable UTF-8 (CSV: has Q and A columns) and find its document layout."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            if path.suffix == ".csv":
                rows = _csv_rows(f, path)
                header = next(rows, [])
                if not {"Q", "A"} <= set(header):
                    raise DataError(f"{path}: a CSV input needs Q and A columns, found {header}")
                blank, text = False, sum(1 for _ in rows) > 0  # every row read: bad UTF-8 or CSV fails here
            else:
                blank = text = False
                for line in f:
                    if line.isspace():
                        blank = True
                    else:
                        text = True
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror})") from None
    return FileInfo(path, path.stat().st_size, one_doc_per_line=not blank, has_text=text)


# -- documents ----------------------------------------------------------------------------------
def read_documents(info: FileInfo) -> Iterator[tuple[list[str], int]]:
    """(units, bytes read) per document; units are NFC, stripped, non-empty lines (CSV: one 'Q\\nA' unit)."""
    nfc = lambda s: unicodedata.normalize("NFC", s.strip())  # noqa: E731
    with open(info.path, encoding="utf-8-sig") as f:
        if info.path.suffix == ".csv":
            for row in _csv_rows(f, info.path, csv.DictReader):
                q, a = nfc(row["Q"] or ""), nfc(row["A"] or "")
                yield [f"{q}\n{a}".strip()], len(q.encode()) + len(a.encode()) + 2
            return
        doc: list[str] = []
        nbytes = 0
        for line in f:
            nbytes += len(line.encode())
            line = nfc(line)
            if line:
                doc.append(line)
            if doc and (info.one_doc_per_line or not line):
                yield doc, nbytes
                doc, nbytes = [], 0
        if doc:
            yield doc, nbytes


class Deduper:
    """Drops exact duplicate lines across the whole corpus.

    A one-line document is always deduplicated. Inside longer documents, lines shorter than
    `min_chars` are kept: section titles like '생애.' or '제1조 (목적)' repeat by design.
    """

    def __init__(self, min_chars: int = 10):
        self.min_chars, self.seen, self.dropped = min_chars, set(), 0

    def __call__(self, units: list[str]) -> list[str]:
        keep = []
        for u in units:
            if len(units) > 1 and len(u) < self.min_chars:
                keep.append(u)
                continue
            h = hash(u)  # 64-bit; one process, so stable for the run
            if h in self.seen:
                self.dropped += 1
            else:
                self.seen.add(h)
                keep.append(u)
        return keep


def split_documents(docs: Iterable[str], val_fraction: float) -> Iterator[tuple[str, str]]:
    """(split, text): every round(1/val_fraction)-th document is 'val'. A source of two or more
    documents that would get none gives its last document to 'val', so every source is held out."""
    period = max(1, round(1 / val_fraction))
    held, n_val = None, 0
    for i, doc in enumerate(docs):
        if held is not None:
            yield "train", held
        if (i + 1) % period == 0:
            n_val += 1
            held = None
            yield "val", doc
        else:
            held = doc
    if held is not None:
        yield ("val" if n_val == 0 and i > 0 else "train"), held


def source_documents(source: Source, infos: dict[Path, FileInfo], dedup: Deduper,
                     progress: tqdm | None = None) -> Iterator[str]:
    """The deduplicated document texts of one source (lines joined by newlines)."""
    for path in source.files:
        for units, nbytes in read_documents(infos[path]):
            units = dedup(units)
            if progress is not None:
                progress.update(nbytes)
            if units:
                yield "\n".join(units)


def check_split_options(val_fraction: float, dedup_min_chars: int) -> None:
    """The held-out share and the dedup threshold, as prepare and train-tokenizer both take them."""
    if not 0 < val_fraction <= 0.5:
        raise DataError(f"--val-fraction must be in (0, 0.5], got {val_fraction}")
    if dedup_min_chars < 0:
        raise DataError(f"--dedup-min-chars must be >= 0, got {dedup_min_chars}")


def check_weights(weights: dict[str, float], names: list[str]) -> dict[str, float]:
    """Mixing weights by source name: known names, finite and >= 0, and not every source at 0."""
    unknown = set(weights) - set(names)
    if unknown:
        raise DataError(f"weight for unknown source {sorted(unknown)[0]!r}; sources: {', '.join(names)}")
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise DataError(f"the weight of source {name!r} must be a finite number >= 0, got {w!r}")
    if names and all(weights.get(n, 1.0) == 0 for n in names):
        raise DataError(f"every source has weight 0 ({', '.join(names)}): give at least one a positive weight")
    return dict(weights)


def write_training_text(sources: list[Source], infos: dict[Path, FileInfo], path: Path, *, val_fraction: float,
                        dedup_min_chars: int, keep: float = 1.0, progress: tqdm | None = None
                        ) -> tuple[int, dict[str, list[str]]]:
    """Write the documents `prepare` puts in train.bin to `path` (every 1/keep-th of each source's),
    and return (documents written, {source: the documents prepare holds out for val.bin}).

    Read, deduplicated and split exactly as prepare does with the same val_fraction and dedup_min_chars.
    """
    check_split_options(val_fraction, dedup_min_chars)
    held_out: dict[str, list[str]] = {}
    dedup, written = Deduper(dedup_min_chars), 0
    with open(path, "w", encoding="utf-8") as f:
        for src in sources:
            n = 0
            for split, doc in split_documents(source_documents(src, infos, dedup, progress), val_fraction):
                if split == "val":
                    held_out.setdefault(src.name, []).append(doc)
                    continue
                if int((n + 1) * keep) > int(n * keep):  # every 1/keep-th document
                    f.write(doc + "\n")
                    written += 1
                n += 1
    return written, held_out




def chars_per_token(tokenizer, texts: list[str]) -> float:
    """Characters per token of `texts` (higher is a more compact tokenizer)."""
    n_tok = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    return sum(len(t) for t in texts) / max(1, n_tok)
