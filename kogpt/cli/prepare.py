"""`kogpt prepare`: a folder of Korean text → train.bin / val.bin token memmaps and meta.json."""

from __future__ import annotations

import argparse
import math

from ..errors import UserError

NAME = "prepare"
HELP = "tokenize a text corpus into train/val token files for `kogpt train`"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", action="extend", required=True, metavar="PATH",
                   help="text files, folders (each sub-folder is a source), globs, or NAME=PATH to name a source")
    p.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="tokenizer folder (from `kogpt train-tokenizer`, or a model folder), or a bundled model's "
                        "name (kogpt-mini): continued pretraining needs the model's own tokenizer")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: train.bin, val.bin, meta.json, tokenizer/")
    p.add_argument("--val-fraction", type=float, default=0.005, metavar="F",
                   help="fraction of every source's documents held out for validation (default: 0.005)")
    p.add_argument("--weight", action="append", default=[], metavar="NAME=W",
                   help="mixing weight of a source (default 1; a source's share of training windows is "
                        "weight × its tokens); repeatable")
    p.add_argument("--dedup-min-chars", type=int, default=10, metavar="N",
                   help="inside multi-line documents, keep duplicate lines shorter than N characters "
                        "(section titles); one-line documents are always deduplicated (default: 10)")
    p.add_argument("--num-workers", type=int, default=None, metavar="N",
                   help="tokenizer processes (default: one per CPU core; 1 tokenizes in this process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_weights(specs: list[str]) -> dict[str, float]:
    """{source: weight} of --weight NAME=W flags; each W a finite number >= 0 (whether the names exist,
    and that not all are 0, is checked against the sources)."""
    out = {}
    for spec in specs:
        name, _, w = spec.partition("=")
        try:
            out[name] = float(w)
        except ValueError:
            raise UserError(f"--weight takes NAME=WEIGHT, got {spec!r}") from None
        if not name:
            raise UserError(f"--weight takes NAME=WEIGHT, got {spec!r}")
        if not math.isfinite(out[name]) or out[name] < 0:
            raise UserError(f"--weight {spec}: a weight must be a finite number >= 0")
    return out


def run(args: argparse.Namespace) -> int:
    from ..hf.hub import local_folder
    from ..data.tokens import prepare

    meta = prepare(args.input, local_folder(args.tokenizer) or args.tokenizer, args.out, val_fraction=args.val_fraction,
                   weights=parse_weights(args.weight), dedup_min_chars=args.dedup_min_chars,
                   num_workers=args.num_workers, show_progress=not args.no_progress)
    print(f"{'source':<24} {'weight':>6} {'train tokens':>13} {'val tokens':>11} {'dup lines':>10}")
    for s in meta["sources"]:
        print(f"{s['name']:<24} {s['weight']:>6g} {s['train']['tokens']:>13,} {s['val']['tokens']:>11,} "
              f"{s['duplicate_lines_dropped']:>10,}")
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    print(f"train: {tr['tokens']:,} tokens ({tr['bytes'] / tr['tokens']:.2f} bytes/token), val: {va['tokens']:,} "
          f"tokens, {meta['dtype']} → {args.out}")
    return 0
