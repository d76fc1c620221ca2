"""Does PPLM steering work for Korean? Topic relevance and fluency, steered vs unsteered, same seeds.

For every topic and prompt, `--samples` continuations are sampled with the same seed twice: without
steering and with PPLM bag-of-words steering toward the topic (upstream knobs; sampling top_k 10 as
upstream for both; end of text is banned so every sample has the full length). Reported per topic:
- relevance: the share of continuations containing at least one of the topic's words (plain
  substring match on the continuation, so a word inside a longer word counts, e.g. 축구 in 축구장),
  and the mean number of topic-word occurrences;
- fluency: the mean log-likelihood per token of the continuation under the unsteered model (given
  the prompt), and its perplexity.

    python benchmarks/steering.py --model kogpt-mini --json steering.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from tqdm import tqdm

from kogpt.api import KoGPT
from kogpt.errors import UserError
from kogpt.generation.steering import TOPICS, read_words

PROMPTS = ("오늘은", "요즘 사람들은", "그 이야기를 듣고 나는", "이번 주말에", "가장 중요한 것은")
DEFAULT_TOPICS = ("sports", "economy", "politics", "science", "fantasy")


def table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *rows])


def continuation_loglik(gpt: KoGPT, prompt: str, text: str) -> tuple[float, int]:
    """(log-likelihood in nats, tokens) of `text` after `prompt` under the model."""
    n = len(gpt.tokenizer.encode(prompt + text)) - len(gpt.tokenizer.encode(prompt))
    if n <= 0:
        return 0.0, 0
    return gpt.score(prompt + text) - gpt.score(prompt), n


def measure(gpt: KoGPT, samples: list[tuple[str, str]], words: list[str]) -> dict:
    hits = [sum(text.count(w) for w in words) for _, text in samples]
    ll = [continuation_loglik(gpt, p, t) for p, t in samples]
    nats, toks = sum(x for x, _ in ll), sum(n for _, n in ll)
    mean = nats / toks if toks else float("nan")
    return {"relevant": sum(h > 0 for h in hits) / len(samples), "mentions": sum(hits) / len(samples),
            "loglik_per_token": mean, "ppl": math.exp(-mean) if toks else float("nan"), "tokens": toks}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="kogpt-mini")
    p.add_argument("--dtype", default="fp32", help="fp32 (default), bf16, ...")
    p.add_argument("--topics", default=",".join(DEFAULT_TOPICS), help=f"comma-separated, from {', '.join(TOPICS)}")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts")
    p.add_argument("--samples", type=int, default=4, help="continuations per prompt (seeds)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--stepsize", default="0.02,0.05", help="PPLM stepsizes, comma-separated (upstream default 0.02)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write results and every sample here")
    args = p.parse_args(argv)
    try:
        words = dict(read_words(t.strip()) for t in args.topics.split(",") if t.strip())  # English name -> words
        topics = list(words)
        stepsizes = [float(x) for x in args.stepsize.split(",")]
        if not 1 <= args.prompts <= len(PROMPTS) or args.samples < 1 or args.max_new_tokens < 1:
            raise UserError("--prompts, --samples and --max-new-tokens must be >= 1 (prompts at most "
                            f"{len(PROMPTS)})")
        gpt = KoGPT.from_pretrained(args.model, dtype=args.dtype)
    except UserError as e:
        print(f"steering.py: error: {e}", file=sys.stderr)
        return 2
    prompts = PROMPTS[:args.prompts]
    eos = gpt.tokenizer.eos_id  # every sample gets the full length: no early end of text
    sampling = dict(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=1.0, top_k=10,
                    repetition_penalty=1.0, num_return_sequences=args.samples,
                    bad_words_ids=((eos,),) if eos is not None else ())

    def run(bow=None, stepsize=0.0) -> tuple[list[tuple[str, str]], float]:
        out, t0 = [], time.perf_counter()
        for i, prompt in enumerate(prompts):
            texts = gpt.generate(prompt, seed=args.seed + i, bow=bow, pplm={"stepsize": stepsize}, **sampling)
            out += [(prompt, t) for t in ([texts] if isinstance(texts, str) else texts)]
        return out, time.perf_counter() - t0

    plain, plain_s = run()
    rows, results = [], {"model": args.model, "dtype": args.dtype, "prompts": list(prompts), "samples": args.samples,
                         "max_new_tokens": args.max_new_tokens, "stepsizes": stepsizes, "seed": args.seed,
                         "sampling": {"temperature": 1.0, "top_k": 10}, "topics": {}}
    for topic, stepsize in tqdm([(t, z) for t in topics for z in stepsizes], desc="topic × stepsize", file=sys.stderr):
        steered, steered_s = run(topic, stepsize)
        a, b = measure(gpt, plain, words[topic]), measure(gpt, steered, words[topic])
        results["topics"].setdefault(topic, {})[str(stepsize)] = {
            "unsteered": a, "steered": b, "seconds": {"unsteered": plain_s, "steered": steered_s},
            "samples": [{"prompt": p, "unsteered": u, "steered": s} for (p, u), (_, s) in zip(plain, steered)]}
        rows.append([f"{topic} ({TOPICS.get(topic, '')})", f"{stepsize:g}", str(len(plain)),
                     f"{a['relevant']:.0%} → {b['relevant']:.0%}", f"{a['mentions']:.2f} → {b['mentions']:.2f}",
                     f"{a['loglik_per_token']:.2f} → {b['loglik_per_token']:.2f}", f"{a['ppl']:.1f} → {b['ppl']:.1f}",
                     f"{steered_s / max(plain_s, 1e-9):.1f}×"])
    print(table(["topic", "stepsize", "samples", "with topic words", "topic words / sample",
                          "log-lik / token", "perplexity", "time"], rows))
    print(f"\n{args.model}, {len(prompts)} prompts × {args.samples} seeds, {args.max_new_tokens} new tokens, "
          "temperature 1.0, top_k 10; PPLM knobs other than stepsize upstream's; "
          "unsteered → steered; log-likelihood under the unsteered model")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, ensure_ascii=False, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
