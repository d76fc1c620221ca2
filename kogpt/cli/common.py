"""Flags shared by the commands that load a model (--model, --revision, --device, --dtype), sampling flags,
and loading what they name: a KoGPT (load) or a finetuned classifier (classifier_folder, load_classifier)."""

from __future__ import annotations

import argparse
import sys

from ..core import dtypes  # torch-free: --help stays fast
from ..errors import UserError


def default_model() -> str | None:
    """The bundled model every --model defaults to (kogpt-mini), if this install has it."""
    from importlib.resources import files

    return "kogpt-mini" if files("kogpt").joinpath("models/kogpt-mini/config.json").is_file() else None


def add_model_arguments(p: argparse.ArgumentParser, decodes: bool = False) -> None:
    """--model, --revision, --device, --dtype, --debug; commands that decode text also get --compile."""
    g = p.add_argument_group("model")
    default = default_model()
    g.add_argument("--model", default=default,
                   help="model folder (HF format), bundled model name or Hugging Face hub id, e.g. skt/kogpt2-base-v2"
                        + (f" (default: {default}, bundled)" if default else ""))
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit), e.g. KoGPT6B-ryan1.5b-float16")
    g.add_argument("--adapter", default=None, metavar="DIR",
                   help="apply a LoRA adapter (PEFT folder, e.g. from kogpt sft --lora-r, or bundled: kogpt-mini-chat) "
                        "without merging; works with every --dtype")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available, else cpu")
    g.add_argument("--dtype", default="auto", choices=dtypes.NAMES,
                   help="weights dtype (default: the checkpoint's); int8 = int8 weights with bf16 activations; "
                        "int8-dynamic = int8 weights and inputs (fbgemm: fastest CPU decode, twice int8's memory); "
                        "int4 = 4-bit weights with a scale and zero per 32 inputs (int4-g64, int4-g128: per 64, "
                        "128: smaller, a little less exact)")
    g.add_argument("-d", "--debug", action="store_true", help="show token ids, timings and full tracebacks")
    if decodes:
        g.add_argument("--compile", action="store_true",
                       help="decode with a torch.compile'd step (meant for GPUs: CUDA graphs; the first tokens wait "
                            "for the compiler; on CPU the default eager step measured faster)")
        g.add_argument("--speculate", type=_draft_length, default=0, metavar="K",
                       help="speculative decoding: draft up to K tokens per step from the text so far and verify "
                            "them in one forward (greedy: the same tokens; sampling: the same distribution); faster "
                            "when the output repeats its input (default: 0, off)")


def _draft_length(text: str) -> int:
    k = int(text)
    if k < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0 (0: off), got {k}")
    return k


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding (defaults: the model's generation config)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate")
    g.add_argument("--max-length", type=int, default=None, help="prompt + generated tokens (as the model cards count)")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature; 0 means greedy")
    g.add_argument("--greedy", action="store_true", default=None, help="greedy decoding (argmax)")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min-p × the top probability")
    g.add_argument("--typical-p", type=float, default=None, help="locally typical sampling mass in (0, 1]")
    g.add_argument("--repetition-penalty", type=float, default=None, help="CTRL repetition penalty (1: off)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=None, help="never repeat an n-gram of this size")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")


PPLM_FLAGS = {"stepsize": float, "num_iterations": int, "kl_scale": float, "gm_scale": float, "gamma": float,
              "window_length": int, "grad_length": int}  # kogpt.generation.steering.PPLMConfig fields


def add_steering_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("steering (PPLM bag of words; top-k defaults to 10 when steering)")
    g.add_argument("--bow", action="append", default=[], metavar="TOPIC|FILE",
                   help="steer toward a bundled topic (sports 스포츠, economy 경제, politics 정치, science 과학, "
                        "fantasy 판타지, horror 공포, mystery 추리, space 우주) or a word-list file (repeatable)")
    g.add_argument("--bow-words", default=None, metavar="W1,W2,...", help="steer toward these comma-separated words")
    for name, kind in PPLM_FLAGS.items():  # defaults: upstream PPLM's (kogpt.generation.steering.PPLMConfig; docs/steering.md)
        g.add_argument(f"--pplm-{name.replace('_', '-')}", type=kind, default=None, metavar="N" if kind is int else "X",
                       help=f"PPLM {name}" + ("; 0 turns steering off" if name == "stepsize" else ""))


def steering_options(args: argparse.Namespace) -> dict:
    """bow / pplm keyword arguments of KoGPT.iter_completions from parsed flags; checked before loading."""
    from ..generation.steering import PPLMConfig, read_words

    bags: list = [read_words(spec)[1] for spec in args.bow]  # a missing topic or file fails before loading
    if args.bow_words is not None:
        words = [w.strip() for w in args.bow_words.split(",") if w.strip()]
        if not words:
            raise UserError("--bow-words needs at least one word, e.g. --bow-words 축구,야구")
        bags.append(words)
    pplm = {k: getattr(args, f"pplm_{k}") for k in PPLM_FLAGS if getattr(args, f"pplm_{k}") is not None}
    PPLMConfig.from_dict(pplm)
    if pplm and not bags:
        raise UserError("--pplm-* options need --bow or --bow-words")
    if not bags:
        return {}
    return {"bow": bags, "pplm": pplm}  # a list of word lists: one bag each


def sampling_options(args: argparse.Namespace) -> dict:
    """The generation options of KoGPT.options() taken from parsed flags."""
    keys = ("max_new_tokens", "max_length", "temperature", "greedy", "top_k", "top_p", "min_p", "typical_p",
            "repetition_penalty", "no_repeat_ngram_size")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def check_sampling_options(args: argparse.Namespace) -> None:
    """Raise UserError for out-of-range decoding flags (before any model is loaded)."""
    from ..generation.sampling import SamplingConfig

    opts = sampling_options(args)
    for name in ("max_new_tokens", "max_length"):
        if opts.get(name) is not None and opts[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {opts[name]}")
    fields = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "no_repeat_ngram_size")
    SamplingConfig(**{k: opts[k] for k in fields if k in opts})


def _check_device(args: argparse.Namespace) -> None:
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for, but no CUDA device is available")


def load(args: argparse.Namespace):
    """KoGPT for the --model/--revision/--device/--dtype flags, with a one-line status on stderr."""
    from ..api import KoGPT

    if not args.model:
        raise UserError("no model given: pass --model with a model folder or a Hugging Face hub id")
    _check_device(args)
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    compile = getattr(args, "compile", False)  # only the commands that decode have --compile
    gpt = KoGPT.from_pretrained(args.model, revision=args.revision, device=args.device, dtype=args.dtype,
                                compile=compile, adapter=args.adapter)
    gpt.speculate = getattr(args, "speculate", 0)  # the decoding commands' default for every request
    w = gpt.model.wte.weight
    print(f"loaded {args.model}: {gpt.model.config.family}, {gpt.model.config.num_params() / 1e6:.1f}M parameters, "
          f"{str(w.dtype).removeprefix('torch.')} on {w.device}" + (", torch.compile'd decode step" if compile else "")
          + (f", adapter {args.adapter}" if args.adapter else ""), file=sys.stderr, flush=True)
    return gpt


def classifier_folder(args: argparse.Namespace):
    """The resolved --model folder when it holds a finetuned classifier or --adapter is a classifier adapter
    (a LoRA finetune's, SEQ_CLS), else None."""
    from ..hf.hub import resolve

    if not args.model:
        return None  # load() names the missing flag
    folder = resolve(args.model, args.revision)
    return folder if classifier_head(args, folder) is not None else None


def classifier_head(args: argparse.Namespace, folder):
    """The Head of a classifier --adapter, else of a classifier folder; None for a language model."""
    from ..hf.folder import is_classifier, read_head
    from ..hf.hub import resolve
    from ..hf.peft import read_adapter_head

    found = read_adapter_head(resolve(args.adapter)) if getattr(args, "adapter", None) else None
    if found is not None:
        return found[0]
    return read_head(folder)[0] if is_classifier(folder) else None


def load_classifier(args: argparse.Namespace, folder, head):
    """(Classifier, Tokenizer) of a classifier folder (or a base + classifier --adapter) whose Head is `head`
    (classifier_head), for --device/--dtype, with status lines on stderr."""
    from ..api import default_device
    from ..hf.folder import CheckpointError
    from ..hf.hub import resolve
    from ..hf.load import load as load_folder
    from ..text.tokenizer import Tokenizer

    _check_device(args)
    print(f"loading {args.model} (finetuned classifier) ...", file=sys.stderr, flush=True)
    adapter = resolve(args.adapter) if args.adapter else None
    model = load_folder(folder, args.dtype, args.device or default_device(), adapter=adapter)
    try:
        tok = Tokenizer.from_dir(folder)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: no usable tokenizer (tokenizer.json, or vocab.json + merges.txt): {e}")
    w = model.gpt.wte.weight
    print(f"loaded {args.model}: {model.config.family} + {head.task or 'a'} head of {len(head.labels)} output(s), "
          f"{str(w.dtype).removeprefix('torch.')} on {w.device}" + (f", adapter {args.adapter}" if adapter else ""),
          file=sys.stderr, flush=True)
    return model, tok
