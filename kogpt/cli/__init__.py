"""The `kogpt` command line: `python -m kogpt` (the interactive prompt) and its subcommands.

Each subcommand lives in its own module of this package and defines NAME, HELP,
add_arguments(parser) and run(args) -> int; run parses nothing and calls one library function.
User errors (kogpt.errors.UserError, missing files) print one line and exit 2.

    kogpt generate --model DIR --prompt "안녕하세요"
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from .. import __version__
from ..errors import UserError

# subcommand modules in the order `kogpt --help` lists them; absent ones are skipped
_MODULES = ("interactive", "generate", "adventure", "train_tokenizer", "prepare", "train", "eval", "finetune",
            "sft", "merge", "serve", "bench")


def _commands():
    for name in _MODULES:
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            yield importlib.import_module(f"{__name__}.{name}")


def _names() -> set[str]:
    return {mod.NAME for mod in _commands()}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; given `command`, only that subcommand gets its flags (the others would import
    their libraries just to describe them: `kogpt generate` need not load the training stack)."""
    parser = argparse.ArgumentParser(
        prog="kogpt", description="Korean GPT toolkit: run, generate, train, evaluate and export.")
    parser.add_argument("--version", action="version", version=f"kogpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _commands():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        if command in (None, mod.NAME):
            mod.add_arguments(p)
        p.set_defaults(run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the process is kogpt's own (`kogpt ...`, `python -m kogpt`), not a caller's
        # PyTorch backs big CPU tensors with 2 MiB pages: fewer TLB misses while decode streams the weights
        # (bf16 decode measured 10-15% faster). Read once, at torch's first allocation; =0 turns it off.
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["interactive", *argv]  # `python -m kogpt [--model M ...]` is the interactive prompt
    parser = build_parser(argv[0] if argv[0] in _names() else "")  # `kogpt --help`: no subcommand's flags
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (UserError, OSError) as e:  # OSError: missing/unreadable files, a file where a folder belongs
        if getattr(args, "debug", False):
            raise
        msg = str(e)
        if isinstance(e, OSError) and e.strerror and e.filename:
            msg = f"{e.strerror}: {e.filename}"
        print(f"kogpt {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
