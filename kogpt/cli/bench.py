"""`kogpt bench`: decode speed, time to first token, load time and peak RSS against transformers
(and llama.cpp on the GGUF export: llama-bench for batch 1 and prompts, when on PATH or given, and
llama-batched-bench for batch 8, when beside it or given)."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError
from ..core import dtypes

NAME = "bench"
HELP = "benchmark kogpt against transformers on the same weights (table with ratios)"
DEFAULT_DTYPES = ("fp32", "bf16", "int8", "int8-dynamic", "int4")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="model folder to benchmark (default: random weights of --preset's shape)")
    p.add_argument("--preset", default="kogpt2-base-v2", help="shape for random weights (default: kogpt2-base-v2)")
    p.add_argument("--dtype", action="append", choices=dtypes.NAMES[1:], default=None,
                   help=f"dtypes to measure (repeatable; default: {', '.join(DEFAULT_DTYPES)})")
    p.add_argument("--repeats", type=int, default=3, help="repetitions per measure; the median is reported")
    p.add_argument("--no-peer", action="store_true", help="skip transformers (kogpt numbers only)")
    p.add_argument("--llama-bench", default=None, metavar="PATH",
                   help="llama.cpp's llama-bench binary for the llama.cpp b1 and TTFT columns "
                        "(default: llama-bench on PATH)")
    p.add_argument("--llama-batched-bench", default=None, metavar="PATH",
                   help="llama.cpp's llama-batched-bench binary for the llama.cpp b8 column: 8 sequences, the "
                        "same prompts and new tokens as kogpt's b8 (default: the one beside llama-bench)")
    p.add_argument("--no-llama-bench", action="store_true", help="skip llama.cpp even if its binaries are found")
    p.add_argument("--compile", action="store_true",
                   help="add a row per float dtype for the torch.compile'd decode step (compiled during warm-up)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")


def run(args: argparse.Namespace) -> int:
    from ..apps import bench

    from ..hf.folder import load_config
    from ..core.config import PRESETS

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
    llama_bench = llama_batched = None
    if not args.no_llama_bench:
        llama_bench = _llama_tool(args.llama_bench, "llama-bench", "--llama-bench")
        llama_batched = _llama_batched(args.llama_batched_bench, llama_bench)
    folder = args.model
    if folder is None:
        folder = Path(tempfile.gettempdir()) / f"kogpt-bench-{args.preset}"
        print(f"random weights of {args.preset} in {folder}", flush=True)
        bench.make_random_checkpoint(folder, args.preset)
    elif not (folder / "config.json").exists():
        raise UserError(f"{folder} is not a model folder (no config.json)")
    else:
        load_config(folder)  # a malformed config.json fails here, in one line
    rows = bench.run_bench(folder, args.dtype or list(DEFAULT_DTYPES), args.repeats,
                           not args.no_peer, llama_bench=llama_bench, compile=args.compile,
                           llama_batched=llama_batched)
    print(bench.format_table(rows))
    if args.json:
        result = {"model": str(folder), "rows": rows}
        if llama_bench:
            build = next((r for r in rows if r.get("llama_build_commit") is not None), {})
            result["llama_bench"] = {"path": llama_bench, "build_number": build.get("llama_build_number"),
                                     "build_commit": build.get("llama_build_commit")}
        if llama_batched:
            result["llama_batched_bench"] = {"path": llama_batched}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _llama_tool(path: str | None, name: str, flag: str) -> str | None:
    # an explicit path must work; a binary found on PATH is used only if gguf is installed too
    found = shutil.which(path or name)
    if path and found is None:
        raise UserError(f"{flag} {path}: not an executable file")
    if found is None:
        return None
    try:
        import gguf  # noqa: F401
    except ImportError:
        if path:
            raise UserError(f"{flag} needs the gguf package for the GGUF export; pip install gguf") from None
        print(f"{name} is on PATH but gguf is not installed (pip install gguf): no llama.cpp columns", flush=True)
        return None
    return str(Path(found).resolve())


def _llama_batched(path: str | None, llama_bench: str | None) -> str | None:
    # given, or the llama-batched-bench that the same llama.cpp build put beside llama-bench
    if path:
        return _llama_tool(path, "llama-batched-bench", "--llama-batched-bench")
    if llama_bench is None:
        return None
    beside = shutil.which("llama-batched-bench", path=str(Path(llama_bench).parent))
    if beside is None:
        print(f"no llama-batched-bench beside {llama_bench}: no llama.cpp b8 column "
              "(build it with llama-bench, or pass --llama-batched-bench PATH)", flush=True)
    return beside and str(Path(beside).resolve())
