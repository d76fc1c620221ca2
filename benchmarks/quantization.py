"""What the 16-bit, int8 and int4 layouts cost in quality, against fp32: held-out bits per byte and greedy agreement.

For each --dtype, the same model is loaded with `KoGPT.from_pretrained(..., dtype=)` and
- scored on --data with `kogpt eval --task perplexity`'s evaluator (bits per UTF-8 byte, sliding
  window), reported with its relative change from fp32;
- asked for greedy continuations of --prompts prompts (the first 24 characters of the first
  documents of --data): the share of continuations identical to fp32's and the mean share of
  tokens before the first difference.

    python benchmarks/quantization.py --model kogpt-mini --data heldout/kowiki.txt --json quant.json
    python benchmarks/quantization.py --data heldout/kowiki.txt --dtypes int4,int4-g64,int4-g128  # the int4 groups
"""

from __future__ import annotations

import argparse
import json
import sys

from kogpt.api import KoGPT
from kogpt.errors import UserError
from kogpt.evaluation.perplexity import evaluate_perplexity, read_documents


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[float, float]:
    """(share of identical continuations, mean share of tokens before the first difference)."""
    same, prefix = 0, 0.0
    for a, b in zip(ref, got):
        same += a == b
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix += n / max(len(a), 1)
    return same / len(ref), prefix / len(ref)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="kogpt-mini")
    p.add_argument("--data", required=True, help="held-out text (blank line between documents)")
    p.add_argument("--dtypes", default="fp32,bf16,int8,int8-dynamic,int4")
    p.add_argument("--limit", type=int, default=None, help="score the first N documents only")
    p.add_argument("--prompts", type=int, default=32, help="greedy prompts taken from the documents")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    try:
        docs = read_documents(args.data)[:args.limit]
        if not docs:
            raise UserError(f"{args.data} holds no documents")
        prompts = [d[:24] for d in docs[:args.prompts]]
        rows, ref = {}, None
        for dtype in ["fp32", *[d for d in dtypes if d != "fp32"]]:
            gpt = KoGPT.from_pretrained(args.model, dtype=dtype)
            ppl = evaluate_perplexity(gpt, docs)
            greedy = [c.token_ids for c in gpt.complete(prompts, greedy=True, max_new_tokens=args.new_tokens,
                                                         repetition_penalty=1.0)]
            ref = ref or (ppl["metrics"]["bits_per_byte"], greedy)
            same, prefix = agreement(ref[1], greedy)
            rows[dtype] = {"bits_per_byte": ppl["metrics"]["bits_per_byte"],
                           "bpb_change": ppl["metrics"]["bits_per_byte"] / ref[0] - 1,
                           "greedy_identical": same, "greedy_prefix": prefix, "tokens": ppl["tokens"]}
            print(f"{dtype}: {rows[dtype]}", file=sys.stderr, flush=True)
    except UserError as e:
        print(f"quantization.py: error: {e}", file=sys.stderr)
        return 2
    print("| dtype | bits per byte | vs fp32 | greedy continuations identical | tokens before the first difference |")
    print("|---|---|---|---|---|")
    for dtype, r in rows.items():
        print(f"| {dtype} | {r['bits_per_byte']:.4f} | {r['bpb_change']:+.2%} | {r['greedy_identical']:.0%} "
              f"| {r['greedy_prefix']:.0%} |")
    print(f"\n{args.model} on {args.data}: {len(docs)} documents, {rows['fp32']['tokens']} tokens; "
          f"{len(prompts)} greedy prompts × {args.new_tokens} tokens")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "data": args.data, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
