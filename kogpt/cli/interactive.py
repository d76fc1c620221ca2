"""`python -m kogpt`: the KakaoBrain interactive prompt — prompt, temperature, max_length, streamed answer."""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import UserError
from .common import add_model_arguments, load

NAME = "interactive"
HELP = "interactive prompt (what `python -m kogpt` runs)"
GOODBYE = "bye! (안녕히 가세요)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, decodes=True)


def ask(label: str, default, convert, valid, why: str):
    """Ask until the answer is empty (default) or converts and is valid."""
    while True:
        answer = input(f"{label}({default})> ").strip()
        if not answer:
            return default
        try:
            value = convert(answer)
        except ValueError:
            value = None
        if value is not None and valid(value):
            return value
        print(f"  {why}; got {answer!r}", flush=True)


def run(args: argparse.Namespace) -> int:
    gpt = load(args)
    defaults = gpt.defaults
    temp0 = defaults.sampling.temperature if defaults.sampling.do_sample else 0.8
    len0 = defaults.max_length or 128
    try:
        while True:
            prompt = input("prompt> ")
            if not prompt.strip():
                continue
            temperature = ask("temperature", temp0, float, lambda t: t > 0, "temperature must be a number > 0")
            max_length = ask("max_length", len0, int, lambda n: n > 0, "max_length must be a whole number > 0")
            _answer(gpt, prompt, temperature, max_length, args.debug)
    except (EOFError, KeyboardInterrupt):
        print(f"\n{GOODBYE}", flush=True)
    return 0


def _answer(gpt, prompt: str, temperature: float, max_length: int, debug: bool) -> None:
    print(prompt, end="", flush=True)
    start, n = time.perf_counter(), 0
    try:
        for _, piece, done in gpt.iter_completions([prompt], temperature=temperature, do_sample=True,
                                                   max_length=max_length):
            print(piece, end="", flush=True)
            if done is not None:
                n = len(done.token_ids)
                finish = done.finish_reason
    except UserError as e:
        print(f"\n  {e}", flush=True)
        return
    print(flush=True)
    if debug:
        dt = time.perf_counter() - start
        print(f"  [{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tokens/s, finish: {finish}]", file=sys.stderr)
