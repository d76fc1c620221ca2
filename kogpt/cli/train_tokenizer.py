"""`kogpt train-tokenizer`: a SentencePiece-style Korean BPE from text, with chars/token on held-out text.

Documents are read, NFC-normalized and deduplicated exactly as `kogpt prepare` does, and the
documents prepare would hold out for validation (same --val-fraction and --dedup-min-chars) are held
out here too: the tokenizer never sees them, and characters per token is measured on them, per source.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

NAME = "train-tokenizer"
HELP = "train a Korean BPE tokenizer (NFC, Metaspace, byte fallback) on text files"
MAX_VOCAB = 1 << 32  # token ids are stored as uint32 by prepare


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", action="extend", required=True, metavar="PATH",
                   help="text files, folders (each sub-folder is a source), globs, or NAME=PATH")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for tokenizer.json and its configs")
    p.add_argument("--vocab-size", type=int, default=51200, metavar="N", help="ids in total, specials included (default: 51200)")
    p.add_argument("--min-frequency", type=int, default=2, metavar="N", help="merge pairs seen at least N times (default: 2)")
    p.add_argument("--sample-mb", type=float, default=0, metavar="MB",
                   help="train on about this many MB, taken evenly from every source (default: 0, all)")
    p.add_argument("--val-fraction", type=float, default=0.005, metavar="F",
                   help="documents held out per source for the chars/token report; use prepare's (default: 0.005)")
    p.add_argument("--dedup-min-chars", type=int, default=10, metavar="N",
                   help="as prepare's: inside multi-line documents, keep duplicate lines shorter than N characters; "
                        "use prepare's so both hold out the same documents (default: 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _check(args: argparse.Namespace) -> None:
    """Every flag in range before any file is read (a one-line UserError otherwise)."""
    from ..data.corpus import check_split_options
    from ..errors import UserError
    from ..fileio import check_output_dir
    from ..text.bpe import MIN_LEARNED, reserved_tokens

    smallest = len(reserved_tokens()) + MIN_LEARNED
    if not smallest <= args.vocab_size <= MAX_VOCAB:
        raise UserError(f"--vocab-size must be in [{smallest}, {MAX_VOCAB}] ({smallest - MIN_LEARNED} ids are "
                        f"reserved for special, emoji and byte tokens), got {args.vocab_size}")
    if not 0 <= args.min_frequency < 1 << 63:
        raise UserError(f"--min-frequency must be in [0, {(1 << 63) - 1}], got {args.min_frequency}")
    if not (math.isfinite(args.sample_mb) and args.sample_mb >= 0):
        raise UserError(f"--sample-mb must be a number >= 0, got {args.sample_mb}")
    check_split_options(args.val_fraction, args.dedup_min_chars)
    check_output_dir(args.out, "--out")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..data.corpus import chars_per_token, find_sources, scan, write_training_text
    from ..errors import UserError
    from ..text.bpe import train_tokenizer

    _check(args)
    sources = find_sources(args.input)
    infos = {p: scan(p) for s in sources for p in s.files}
    if not any(i.has_text for i in infos.values()):
        raise UserError(f"the corpus is empty (no text in {' '.join(args.input)})")
    total = sum(i.size for i in infos.values())
    keep = min(1.0, args.sample_mb * 1e6 / total) if args.sample_mb > 0 else 1.0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kogpt-tok-") as tmp:
        text = Path(tmp) / "train.txt"
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="read", disable=args.no_progress)
        written, held_out = write_training_text(sources, infos, text, val_fraction=args.val_fraction,
                                                dedup_min_chars=args.dedup_min_chars, keep=keep, progress=bar)
        bar.close()
        if not written:
            raise UserError(f"no documents to train on: --sample-mb {args.sample_mb:g} takes none of them")
        tok = train_tokenizer([text], args.vocab_size, min_frequency=args.min_frequency,
                              show_progress=not args.no_progress)
    tok.save(args.out)
    print(f"trained a {tok.vocab_size}-token tokenizer in {time.perf_counter() - t0:.0f} s → {args.out}")
    print("characters per token on held-out documents:")
    for name, docs in held_out.items():
        print(f"  {name:<24} {chars_per_token(tok, docs):.2f}")
    if held_out:
        print(f"  {'all':<24} {chars_per_token(tok, [d for docs in held_out.values() for d in docs]):.2f}")
    return 0
