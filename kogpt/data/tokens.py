"""Corpus → token memmaps (`kogpt prepare`) and the random-window batch sampler that training reads.

Documents come from corpus.py (sources, NFC, deduplication, a held-out slice of every source) and
are tokenized in parallel into `train.bin`/`val.bin` (EOS after each).
A re-prepare builds the new files in a temp folder inside the output folder and swaps them in at the
end, meta.json last: until then the previous data stays whole and usable.

    meta = prepare(["../shared/data/corpus"], "tok", "data"); x = BatchSampler.from_dir("data", 256, 0)
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import tempfile
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from .corpus import (
    DataError,
    Deduper,
    check_split_options,
    check_weights,
    find_sources,
    scan,
    source_documents,
    split_documents,
)
from ..fileio import check_output_dir, read_json, write_json

META_FILE = "meta.json"
SPLITS = ("train", "val")
TOKENIZER_DIR = "tokenizer"  # prepare keeps a copy of the tokenizer beside the tokens
_BATCH_CHARS = 1 << 18  # characters per tokenization task (~0.75 MB of Hangul)
_TMP_PREFIX = ".prepare-"  # the folder a prepare builds in, inside --out


# -- tokenization -------------------------------------------------------------------------------
_worker_tok = None


def _init_worker(tokenizer_dir: str):
    global _worker_tok
    from ..text.tokenizer import Tokenizer

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
    from ..text.tokenizer import Tokenizer

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
