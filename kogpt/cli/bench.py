"""`kogpt bench`: decode speed, time to first token, load time and peak RSS against transformers."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from ..errors import UserError

NAME = "bench"
HELP = "benchmark kogpt against transformers on the same weights (table with ratios)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="model folder to benchmark (default: random weights of --preset's shape)")
    p.add_argument("--preset", default="kogpt2-base-v2", help="shape for random weights (default: kogpt2-base-v2)")
    p.add_argument("--dtype", action="append", choices=["fp32", "bf16", "fp16", "int8", "int8-dynamic"], default=None,
                   help="dtypes to measure (repeatable; default: fp32, bf16, int8, int8-dynamic)")
    p.add_argument("--repeats", type=int, default=3, help="repetitions per measure; the median is reported")
    p.add_argument("--no-peer", action="store_true", help="skip transformers (kogpt numbers only)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")


def run(args: argparse.Namespace) -> int:
    from .. import bench

    from ..checkpoint import load_config
    from ..config import PRESETS

    if args.repeats < 1:
        raise UserError("--repeats must be >= 1")
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    if args.json is not None and args.json.is_dir():
        raise UserError(f"--json {args.json} is a folder; give a file name")
    if not args.no_peer:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise UserError("transformers is not installed; pip install transformers, or pass --no-peer") from None
    folder = args.model
    if folder is None:
        folder = Path(tempfile.gettempdir()) / f"kogpt-bench-{args.preset}"
        print(f"random weights of {args.preset} in {folder}", flush=True)
        bench.make_random_checkpoint(folder, args.preset)
    elif not (folder / "config.json").exists():
        raise UserError(f"{folder} is not a model folder (no config.json)")
    else:
        load_config(folder)  # a malformed config.json fails here, in one line
    rows = bench.run_bench(folder, args.dtype or ["fp32", "bf16", "int8", "int8-dynamic"], args.repeats, not args.no_peer)
    print(bench.format_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"model": str(folder), "rows": rows}, indent=2) + "\n")
    return 0
