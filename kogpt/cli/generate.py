"""`kogpt generate`: continue prompts from flags, a file or stdin; text, streamed text, or JSON lines."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UserError
from .common import (add_model_arguments, add_sampling_arguments, add_steering_arguments, check_sampling_options,
                     load, sampling_options, steering_options)

NAME = "generate"
HELP = "continue one or more prompts (non-interactive)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, decodes=True)
    src = p.add_argument_group("prompts (default: one per line from stdin)")
    src.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    src.add_argument("--prompt-file", type=Path, help="a UTF-8 file with one prompt per line")
    add_sampling_arguments(p)
    add_steering_arguments(p)
    out = p.add_argument_group("output")
    out.add_argument("--num-return-sequences", type=int, default=1, help="continuations per prompt")
    out.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    out.add_argument("--stream", action="store_true", help="print text as it is generated")
    out.add_argument("--json", action="store_true",
                     help="one JSON object per line: prompt, completion, completion_token_ids, finish_reason")


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            text = args.prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{args.prompt_file} is not UTF-8 text") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts and not sys.stdin.isatty():
        prompts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not prompts:
        raise UserError("no prompt: pass --prompt TEXT, --prompt-file FILE, or prompts on stdin")
    return prompts


def run(args: argparse.Namespace) -> int:
    prompts = read_prompts(args)
    check_sampling_options(args)  # bad options fail before the model loads
    steer = steering_options(args)
    for name in ("num_return_sequences", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    gpt = load(args)
    opts = dict(sampling_options(args), stop=args.stop, seed=args.seed, num_return_sequences=args.num_return_sequences,
                **steer)
    if args.stream:
        for prompt in prompts:
            print(prompt, end="", flush=True)
            for _, piece, done in gpt.iter_completions([prompt], **opts):
                print(piece, end="", flush=True)
                if done is not None:
                    print(flush=True)
                    if args.json:
                        print(_json(done), flush=True)
        return 0
    for c in gpt.complete(prompts, batch_size=args.batch_size, **opts):
        print(_json(c) if args.json else c.prompt + c.text + "\n", flush=True)
    return 0


def _json(c) -> str:
    return json.dumps({"prompt": c.prompt, "completion": c.text, "completion_token_ids": c.token_ids,
                       "finish_reason": c.finish_reason}, ensure_ascii=False)
