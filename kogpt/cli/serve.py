"""`kogpt serve`: the OpenAI-compatible HTTP API and web playground for one model and the LoRA adapters
served beside it (kogpt.serve)."""

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
    g = p.add_argument_group("adapters (many LoRA adapters over one base, like vLLM's --lora-modules)")
    g.add_argument("--lora", action="append", default=[], metavar="NAME=DIR", type=_lora_module,
                   help="serve a PEFT LoRA adapter beside the base as model NAME (repeatable); requests pick it with "
                        "\"model\": NAME and share the batch with the base. Default for the bundled kogpt-mini: its "
                        "bundled chat adapter, kogpt-mini-chat")
    g.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the id the base model answers to in requests' \"model\" (default: --model as given)")
    g.add_argument("--chat-model", default=None, metavar="NAME",
                   help="the model /v1/chat/completions uses when a request names none (default: a bundled chat "
                        "adapter when one is served, else the base)")


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
    if args.lora and args.adapter:
        raise UserError("--adapter applies one adapter to every request; to serve adapters beside the base use "
                        "--lora NAME=DIR for each")
    if args.lora and args.compile:
        raise UserError("--lora serves adapters with the eager decode step; drop --compile")
    names = [name for name, _ in args.lora]
    if len(set(names)) < len(names):
        raise UserError(f"--lora names must differ, got {', '.join(names)}")
    gpt = load(args)
    loras = args.lora or ([] if args.adapter or args.compile else bundled_adapters(gpt.name))
    for name, folder in loras:
        gpt.add_adapter(name, folder)
        print(f"serving adapter {name} ({folder}) beside {gpt.name}", file=sys.stderr, flush=True)
    chat = args.chat_model
    if chat is None and not args.lora:
        chat = next((name for name, _ in loras if name.endswith("-chat")), None)
    serve(gpt, args.host, args.port, log_level="debug" if args.debug else "info", max_batch_size=args.max_batch_size,
          max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit, api_key=args.api_key,
          chat_template=template, max_body_bytes=args.max_body_size, chat_model=chat,
          served_model_name=args.served_model_name)
    return 0


def _lora_module(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name.strip(), folder.strip()


def bundled_adapters(model: str) -> list[tuple[str, str]]:
    """(name, name) of the adapters bundled for bundled model `model` (kogpt-mini: kogpt-mini-chat)."""
    from ..hf.hub import BUNDLED, bundled_models
    from ..hf.peft import adapter_base

    if model not in bundled_models():
        return []
    return [(name, name) for name in bundled_models() if adapter_base(BUNDLED / name) == model]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
