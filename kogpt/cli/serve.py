"""`kogpt serve`: the OpenAI-compatible HTTP API and web playground for one model (kogpt.serve)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from ..errors import UserError
from .common import add_model_arguments, load

NAME = "serve"
HELP = "serve a model over an OpenAI-compatible HTTP API with a web playground"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, decodes=True)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    g.add_argument("--api-key", default=os.environ.get("KOGPT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $KOGPT_API_KEY)")
    g.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together (default: 8)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="sequences waiting for a batch slot before requests get 429 (default: 64)")
    g.add_argument("--max-tokens-limit", type=int, default=None,
                   help="largest max_tokens a request may ask for (default: the model's context)")
    g.add_argument("--chat-template", default=None, metavar="FILE",
                   help="JSON chat template for /v1/chat/completions (default: the built-in Korean one)")
    g.add_argument("--max-body-size", type=int, default=1 << 20, help="largest request body in bytes (default: 1 MiB)")


def run(args: argparse.Namespace) -> int:
    for name in ("max_batch_size", "max_tokens_limit", "max_body_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.max_queue < 0 or not 0 <= args.port < 65536:
        raise UserError("--max-queue must be >= 0 and --port in [0, 65535]")
    try:
        from ..serve import ChatTemplate, serve
    except ImportError as e:
        raise UserError(f"kogpt serve needs fastapi and uvicorn ({e}): pip install 'kogpt[serve]'") from None

    template = ChatTemplate.from_file(args.chat_template) if args.chat_template else None
    if not args.api_key and not _loopback(args.host):
        print(f"kogpt serve: warning: listening on {args.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)
    gpt = load(args)
    serve(gpt, args.host, args.port, log_level="debug" if args.debug else "info", max_batch_size=args.max_batch_size,
          max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit, api_key=args.api_key,
          chat_template=template, max_body_bytes=args.max_body_size)
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
