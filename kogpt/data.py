"""Corpus → token memmaps (`kogpt prepare`) and the random-window batch sampler that training reads.

A source is a named group of files (a sub-folder of an input folder, a file, or `NAME=GLOB`). Text
files hold a paragraph per line and a blank line ends a document; a file without any blank line
holds one document per line (e.g. one review per line); a CSV with Q,A columns is Q/A documents.
Text is NFC-normalized, exact duplicate lines are dropped, every source keeps a held-out slice for
validation, and documents are tokenized in parallel into `train.bin`/`val.bin` (EOS after each).
A re-prepare builds the new files in a temp folder inside the output folder and swaps them in at the
end, meta.json last: until then the previous data stays whole and usable.

    meta = prepare(["../shared/data/corpus"], "tok", "data"); x = BatchSampler.from_dir("data", 256, 0)
"""

from __future__ import annotations

import csv
import glob
import math
import multiprocessing as mp
import os
import shutil
import tempfile
import unicodedata
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from .errors import UserError
from .fileio import check_output_dir, read_json, write_json

META_FILE = "meta.json"
SPLITS = ("train", "val")
TOKENIZER_DIR = "tokenizer"  # prepare keeps a copy of the tokenizer beside the tokens
TEXT_SUFFIXES = (".txt", ".text", ".csv")
_BATCH_CHARS = 1 << 18  # characters per tokenization task (~0.75 MB of Hangul)
_CSV_FIELD_LIMIT = 1 << 30  # characters in one CSV field (Python's default, 128 Ki, is one long answer)
_TMP_PREFIX = ".prepare-"  # the folder a prepare builds in, inside --out


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


# -- tokenization -------------------------------------------------------------------------------
_worker_tok = None


def _init_worker(tokenizer_dir: str):
    global _worker_tok
    from .tokenizer import Tokenizer

    _worker_tok = Tokenizer.from_dir(tokenizer_dir)


def _encode(texts: list[str]) -> np.ndarray:
    """Token ids of the texts, each followed by EOS, as one uint32 array."""
    eos, out = _worker_tok.eos_id, []
    for ids in _worker_tok.encode_batch(texts):
        out.extend(ids)
        out.append(eos)
    return np.asarray(out, dtype=np.uint32)


def _batches(items: Iterable[tuple[str, str]]) -> Iterator[tuple[str, list[str]]]:
    """Group (split, text) into (split, texts) tasks of about _BATCH_CHARS characters."""
    cur = {s: ([], 0) for s in SPLITS}
    for split, text in items:
        texts, n = cur[split]
        texts.append(text)
        n += len(text)
        if n >= _BATCH_CHARS:
            yield split, texts
            texts, n = [], 0
        cur[split] = (texts, n)
    for split, (texts, _) in cur.items():
        if texts:
            yield split, texts


def _ordered_map(pool, tasks: Iterable[tuple[str, list[str]]], depth: int) -> Iterator[tuple[str, list[str], np.ndarray]]:
    """(split, texts, ids) in task order, with at most `depth` tasks in flight (pool.imap would read
    the whole corpus ahead into its queue)."""
    if pool is None:
        for split, texts in tasks:
            yield split, texts, _encode(texts)
        return
    pending: deque = deque()
    for split, texts in tasks:
        pending.append((split, texts, pool.apply_async(_encode, (texts,))))
        if len(pending) > depth:
            split, texts, res = pending.popleft()
            yield split, texts, res.get()
    for split, texts, res in pending:
        yield split, texts, res.get()


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def prepare(inputs: list[str], tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
            val_fraction: float = 0.005, weights: dict[str, float] | None = None, dedup_min_chars: int = 10,
            num_workers: int | None = None, show_progress: bool = True) -> dict:
    """Tokenize a corpus into out_dir/{train,val}.bin, meta.json and a copy of the tokenizer; returns meta.

    weights: mixing weight per source name (default 1): a source's share of training windows is
    proportional to weight × its token count. Stored in meta.json; training may override it.
    The files are built in a temp folder inside out_dir and swapped in once complete (meta.json
    last), so a failed or interrupted prepare leaves the previous data in out_dir as it was.
    """
    from .tokenizer import Tokenizer

    check_split_options(val_fraction, dedup_min_chars)
    check_output_dir(out_dir, "--out")
    if num_workers is not None and num_workers < 1:
        raise DataError(f"--num-workers must be >= 1, got {num_workers}")
    sources = find_sources(inputs)
    weights = check_weights(dict(weights or {}), [s.name for s in sources])
    infos = {p: scan(p) for s in sources for p in s.files}
    if not any(i.has_text for i in infos.values()):
        raise DataError(f"the corpus is empty (no text in {' '.join(inputs)})")
    tok = Tokenizer.from_dir(tokenizer_dir)
    if tok.eos_id is None:
        raise DataError(f"the tokenizer in {tokenizer_dir} has no end-of-text token to end each document with")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    meta = {"format": 1, "tokenizer": {"hash": tok.hash(), "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
            "dtype": np.dtype(dtype).name, "val_fraction": val_fraction, "dedup_min_chars": dedup_min_chars,
            "sources": [], "splits": {s: {"tokens": 0, "bytes": 0, "chars": 0, "docs": 0} for s in SPLITS}}
    dedup = Deduper(dedup_min_chars)

    def write_both(train_path: Path, val_path: Path):
        ctx = mp.get_context("spawn")  # fork after the Rust tokenizer started threads can deadlock
        pool = ctx.Pool(num_workers, _init_worker, (str(tokenizer_dir),)) if num_workers > 1 else None
        if pool is None:
            _init_worker(str(tokenizer_dir))
        bar = tqdm(total=sum(i.size for i in infos.values()), unit="B", unit_scale=True, desc="prepare",
                   disable=not show_progress)
        try:
            with open(train_path, "wb") as ftrain, open(val_path, "wb") as fval:
                files = {"train": ftrain, "val": fval}
                for src in sources:
                    m = {"name": src.name, "files": [str(p) for p in src.files], "weight": weights.get(src.name, 1.0),
                         "one_doc_per_line": all(infos[p].one_doc_per_line for p in src.files)}
                    for s in SPLITS:
                        m[s] = {"start": meta["splits"][s]["tokens"], "tokens": 0, "bytes": 0, "chars": 0, "docs": 0}
                    dropped = dedup.dropped
                    docs = split_documents(source_documents(src, infos, dedup, bar), val_fraction)
                    for split, texts, ids in _ordered_map(pool, _batches(docs), 2 * num_workers):
                        if int(ids.max(initial=0)) >= tok.vocab_size:
                            raise DataError(f"tokenizer produced id {int(ids.max())} >= vocab_size {tok.vocab_size}")
                        ids.astype(dtype).tofile(files[split])
                        c = m[split]
                        c["tokens"] += len(ids)
                        c["docs"] += len(texts)
                        c["chars"] += sum(len(t) + 1 for t in texts)  # +1: the EOS stands for one newline
                        c["bytes"] += sum(len(t.encode()) + 1 for t in texts)
                    m["duplicate_lines_dropped"] = dedup.dropped - dropped
                    for s in SPLITS:
                        for k in ("tokens", "bytes", "chars", "docs"):
                            meta["splits"][s][k] += m[s][k]
                    meta["sources"].append(m)
                for f in files.values():  # on disk before they replace the previous data
                    f.flush()
                    os.fsync(f.fileno())
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()

    for stale in out.glob(_TMP_PREFIX + "*"):  # left by a prepare that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=out))
    try:
        write_both(tmp / "train.bin", tmp / "val.bin")
        tok.save(tmp / TOKENIZER_DIR)
        _swap_in(tmp, out, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _swap_in(tmp: Path, out: Path, meta: dict) -> None:
    """Move the dataset built in `tmp` into `out`. meta.json goes first and comes back last, so a
    folder with a meta.json always holds the data it describes; the swap itself is a few renames."""
    (out / META_FILE).unlink(missing_ok=True)
    for name in (*(f"{s}.bin" for s in SPLITS), TOKENIZER_DIR):
        if (out / name).is_dir():
            os.replace(out / name, tmp / f"old-{name}")  # a folder cannot be replaced in one rename; removed with tmp
        os.replace(tmp / name, out / name)
    write_json(out / META_FILE, meta)


# -- reading prepared data ----------------------------------------------------------------------
def read_meta(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / META_FILE
    if not path.exists():
        raise DataError(f"{path} is missing: run `kogpt prepare --out {data_dir}` first")
    return read_json(path)


def load_tokens(data_dir: str | os.PathLike, split: str, meta: dict | None = None) -> np.ndarray:
    """The token memmap of a split, checked against the length meta.json records."""
    meta = meta or read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    n = meta["splits"][split]["tokens"]
    itemsize = np.dtype(meta["dtype"]).itemsize
    if not path.exists() or path.stat().st_size != n * itemsize:
        raise DataError(f"{path} does not hold the {n} tokens meta.json records: prepare the data again")
    return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(n,))


class BatchSampler:
    """Random windows of seq_len + 1 tokens from a token memmap, mixed over sources by weight.

    Window starts for optimizer step `step` are a pure function of (seed, step), so the data
    position is just the step: resuming needs no other state, and every rank of a torchrun job
    draws the same global batch and reads its own rows.
    """

    def __init__(self, tokens: np.ndarray, sources: list[tuple[int, int]], weights: list[float],
                 seq_len: int, seed: int):
        """sources: (start, length) of each source's tokens; weights: one per source."""
        n = len(tokens)
        if n < seq_len + 1:
            raise DataError(f"the data has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        lo = np.array([a for a, _ in sources], dtype=np.int64)
        length = np.array([m for _, m in sources], dtype=np.int64)
        p = np.array(weights, dtype=np.float64) * length  # weight × tokens: weight 1 everywhere = uniform
        keep = p > 0
        if not keep.any():
            raise DataError("every source has weight 0 or no tokens")
        self.lo, self.span = lo[keep], np.maximum(1, length[keep] - seq_len)  # valid starts per source
        self.p, self.source_index = p[keep] / p[keep].sum(), np.flatnonzero(keep)

    @classmethod
    def from_dir(cls, data_dir, split: str, seq_len: int, seed: int, weights: dict[str, float] | None = None,
                 meta: dict | None = None) -> "BatchSampler":
        """Sampler over a prepared split; weights (by source name) override meta.json's for 'train'.
        The 'val' split is stratified: every source equally often, so each gets a val loss."""
        meta = meta or read_meta(data_dir)
        names = [s["name"] for s in meta["sources"]]
        check_weights(weights or {}, names)
        w = [(weights or {}).get(s["name"], s["weight"]) if split == "train" else 1 / max(1, s[split]["tokens"])
             for s in meta["sources"]]
        spans = [(s[split]["start"], s[split]["tokens"]) for s in meta["sources"]]
        return cls(load_tokens(data_dir, split, meta), spans, w, seq_len, seed)

    def starts(self, step: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(window starts (n,), source index (n,)) of batch `step`."""
        rng = np.random.default_rng([self.seed, step])
        k = rng.choice(len(self.p), size=n, p=self.p)
        start = self.lo[k] + (rng.random(n) * self.span[k]).astype(np.int64)
        start = np.minimum(start, len(self.tokens) - self.seq_len - 1)  # a source shorter than a window
        return start, self.source_index[k]

    def read(self, starts: np.ndarray):
        """LongTensor (len(starts), seq_len + 1): inputs are [:, :-1], targets [:, 1:]."""
        import torch

        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        return torch.from_numpy(rows)


def chars_per_token(tokenizer, texts: list[str]) -> float:
    """Characters per token of `texts` (higher is a more compact tokenizer)."""
    n_tok = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    return sum(len(t) for t in texts) / max(1, n_tok)
