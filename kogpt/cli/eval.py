"""`kogpt eval`: perplexity of a text file, or NSMC / KLUE-YNAT / KLUE-STS / KorSTS few-shot or finetuned.

Reads the data first (a bad file fails before the model loads), calls one evaluation function
(kogpt.evaluation: perplexity, fewshot or finetuned), prints a Markdown table and optionally writes the
full result as JSON. A model folder holding a finetuned classifier (`kogpt finetune`) is scored with its
own head, no prompts.

    kogpt eval --model DIR --task nsmc --data ratings_test.txt --shots 5 --fewshot-data ratings_train.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ..fileio import check_output_file
from .common import add_model_arguments, classifier_folder, classifier_head, load, load_classifier

NAME = "eval"
HELP = "evaluate a model: perplexity of a text file, or a benchmark few-shot (or with a finetuned model's head)"
TASK_NAMES = ("perplexity", "nsmc", "ynat", "klue-sts", "korsts")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--task", required=True, choices=TASK_NAMES, help="what to evaluate")
    g.add_argument("--data", required=True, type=Path,
                   help="evaluation file: any UTF-8 text (perplexity) or the benchmark's own file format")
    g.add_argument("--shots", type=int, default=0, help="demonstrations per prompt (default 0)")
    g.add_argument("--fewshot-data", type=Path, help="file of the same task to draw demonstrations from")
    g.add_argument("--seed", type=int, default=0, help="seed of the demonstration draw (default 0)")
    g.add_argument("--limit", type=int, help="evaluate only the first N examples (documents)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts (perplexity: windows) per forward")
    g.add_argument("--max-length", type=int, help="tokens per forward (default: the model's context)")
    g.add_argument("--stride", type=int, help="perplexity: tokens a window moves on (default: half the window)")
    g.add_argument("--output", type=Path, help="write the result, per-example predictions included, as JSON")


def _check(args: argparse.Namespace) -> None:
    for name, low in (("shots", 0), ("limit", 1), ("batch_size", 1), ("max_length", 2), ("stride", 1)):
        v = getattr(args, name)
        if v is not None and v < low:
            raise UserError(f"--{name.replace('_', '-')} must be >= {low}, got {v}")
    if args.task == "perplexity" and (args.shots or args.fewshot_data):
        raise UserError("--shots and --fewshot-data are for the benchmark tasks, not perplexity")
    if args.task != "perplexity" and args.stride is not None:
        raise UserError("--stride is for --task perplexity")
    if args.output:
        check_output_file(args.output, "--output")
    if args.shots and args.fewshot_data is None:
        raise UserError("--shots needs --fewshot-data: a file to draw demonstrations from")


def run(args: argparse.Namespace) -> int:
    from ..evaluation.classify import check_head
    from ..fileio import write_json
    from ..evaluation.fewshot import evaluate_fewshot
    from ..evaluation.finetuned import evaluate_finetuned
    from ..evaluation.perplexity import evaluate_perplexity, read_documents
    from ..evaluation.report import json_ready, markdown_table
    from ..evaluation.tasks import get_task

    _check(args)
    if args.task == "perplexity":
        docs = read_documents(args.data)[: args.limit]
        if not docs:
            raise UserError(f"{args.data}: no text")
        if classifier_folder(args):
            raise UserError(f"{args.model} is a finetuned classifier: it has no language-model head to score text with")
        gpt = load(args)
        result = evaluate_perplexity(gpt, docs, max_length=args.max_length, stride=args.stride,
                                     batch_size=args.batch_size)
    else:
        task = get_task(args.task)
        examples = task.load(args.data)[: args.limit]
        pool = task.load(args.fewshot_data) if args.shots else []
        folder = classifier_folder(args)
        if folder is not None:
            if args.shots or args.fewshot_data or args.max_length:
                raise UserError(f"{args.model} is a finetuned classifier: it uses its own head, so --shots, "
                                f"--fewshot-data and --max-length do not apply")
            head = classifier_head(args, folder)
            check_head(head, task, args.model)  # before the weights load
            model, tok = load_classifier(args, folder, head)
            result = evaluate_finetuned(model, head, tok, task, examples, batch_size=args.batch_size, name=args.model)
        else:
            gpt = load(args)
            result = evaluate_fewshot(gpt, task, examples, pool=pool, shots=args.shots, seed=args.seed,
                                      batch_size=args.batch_size, max_length=args.max_length)
            result["fewshot_data"] = str(args.fewshot_data) if args.shots else None
    result["data"] = str(args.data)
    print(markdown_table([result]))
    if args.output:
        write_json(args.output, json_ready(result))
    return 0
