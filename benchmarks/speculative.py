"""Speculative decoding with prompt-lookup drafts: decode tokens/s with and without, acceptance rate.

Workloads (prompts from Korean Wikipedia paragraphs in ../shared/data/corpus/kowiki):
- extractive: a paragraph, a blank line, then its first sentence again: the continuation restates text
  the prompt holds, as summaries and quotes do;
- summarize: "다음 글을 요약하시오" + paragraph + "요약:";
- free: the paragraph's first few words only, nothing to copy from.
Each workload runs greedy (repetition penalty off, so a copy is not penalised) and sampled (temperature
0.8, top-p 0.95); k = 0 is plain decoding. Models: the bundled kogpt-mini and a random-init
KoGPT2-base-shape model (its acceptance is a random model's; its rows show what verifying k drafts costs
on a 125M model). Each model and dtype first prints the milliseconds of one forward over 1, 2, 3, 5 and
9 tokens (verifying 0, 1, 2, 4 and 8 drafts). Batch 1 unless --batch. Decode tokens/s excludes the
prefill; every setting alternates within each repeat and the median is reported. Greedy outputs with
and without speculation are compared.

    python benchmarks/speculative.py --json spec.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

from kogpt.apps.bench import make_random_checkpoint
from kogpt.core.kv_cache import KVCache
from kogpt.generation.engine import Engine, Request
from kogpt.generation.sampling import SamplingConfig
from kogpt.hf.hub import resolve
from kogpt.hf.load import load
from kogpt.text.tokenizer import Tokenizer

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "kowiki" / "kowiki_sample.txt"
SAMPLINGS = {"greedy": SamplingConfig(do_sample=False),
             "sampled": SamplingConfig(temperature=0.8, top_p=0.95, top_k=0)}


def paragraphs(n: int, lo: int = 300, hi: int = 600) -> list[str]:
    """The first n Wikipedia paragraphs of lo..hi characters with at least two sentences."""
    out = []
    with open(WIKI, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if lo <= len(line) <= hi and line.count(". ") >= 2:
                out.append(line)
                if len(out) == n:
                    break
    return out


def prompts(workload: str, texts: list[str]) -> list[str]:
    if workload == "extractive":
        return [t + "\n\n" + t.split(". ")[0] + "." for t in texts]
    if workload == "summarize":
        return ["다음 글을 요약하시오.\n\n" + t + "\n\n요약:" for t in texts]
    return [" ".join(t.split()[:4]) for t in texts]  # free


def run(model, batch: list[list[int]], new: int, s: SamplingConfig, k: int, seed: int) -> dict:
    """Prompts decoded together: their tokens, decode seconds (after the first step's prefill), draft counts."""
    engine = Engine(model, slots=len(batch), max_len=max(map(len, batch)) + new)
    for i, ids in enumerate(batch):
        engine.submit(Request(ids, new, s, rng=torch.Generator().manual_seed(seed + i), speculate=k, key=i))
    out: list[list[int]] = [[] for _ in batch]
    first = [out[ev.key].append(ev.token) for ev in engine.step()]
    start = time.perf_counter()
    while not engine.idle:
        for ev in engine.step():
            out[ev.key].append(ev.token)
    return {"tokens": out, "seconds": time.perf_counter() - start, "decoded": sum(map(len, out)) - len(first),
            "drafted": engine.drafted, "accepted": engine.accepted}


@torch.inference_mode()
def forward_ms(model, T: int, past: int = 300, repeats: int = 30) -> float:
    """Median milliseconds of one batch-1 forward of T tokens after `past` cached ones (a verification of T - 1)."""
    cache = KVCache.for_model(model.config, 1, past + T, model.wte.weight.dtype)
    model(torch.randint(0, 1000, (1, past)), cache, slice(0, 1))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(torch.randint(0, 1000, (1, T)), cache, slice(0, 1))
        times.append(time.perf_counter() - start)
        cache.truncate(0, past)
    return statistics.median(times) * 1e3


def measure(model, tok: Tokenizer, texts: list[str], ks: list[int], new: int, repeats: int,
            batch: int) -> Iterator[dict]:
    for k in ks:  # warm up the one-token and the verification forwards
        run(model, [tok.encode(p) for p in prompts("extractive", texts[:batch])], 16, SAMPLINGS["greedy"], k, seed=0)
    for workload in ("extractive", "summarize", "free"):
        ids = [tok.encode(p) for p in prompts(workload, texts)]
        encoded = [ids[i:i + batch] for i in range(0, len(ids), batch)]
        for name, s in SAMPLINGS.items():
            runs = {k: [] for k in ks}
            for r in range(repeats):
                for k in ks:  # alternate, so machine noise hits every k alike
                    runs[k].append([run(model, b, new, s, k, seed=i * batch) for i, b in enumerate(encoded)])
            base = statistics.median(sum(x["decoded"] for x in rep) / sum(x["seconds"] for x in rep) for rep in runs[0])
            for k in ks:
                reps = runs[k]
                tps = statistics.median(sum(x["decoded"] for x in rep) / sum(x["seconds"] for x in rep) for rep in reps)
                drafted, accepted = sum(x["drafted"] for x in reps[0]), sum(x["accepted"] for x in reps[0])
                same = all(a["tokens"] == b["tokens"] for a, b in zip(reps[0], runs[0][0]))
                yield {"workload": workload, "sampling": name, "k": k, "tokens_per_s": tps, "speedup": tps / base,
                       "acceptance": accepted / drafted if drafted else None, "drafted": drafted,
                       "accepted": accepted, "same_as_plain": same if name == "greedy" else None}


def table(rows: list[dict]) -> str:
    head = "| model | dtype | workload | sampling | k | tokens/s | speedup | acceptance | accepted / drafted | same |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        acc = "–" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['workload']} | {r['sampling']} | {r['k']} | "
                     f"{r['tokens_per_s']:.1f} | "
                     f"{r['speedup']:.2f}× | {acc} | {r['accepted']} / {r['drafted']} | "
                     f"{ {True: 'yes', False: 'NO', None: '–'}[r['same_as_plain']]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="kogpt-mini,kogpt2-base-v2",
                   help="bundled names or folders; a preset name (kogpt2-base-v2) means a random model of that shape")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated --dtype names")
    p.add_argument("--k", default="0,2,4,8", help="draft lengths (0: plain decoding, always measured)")
    p.add_argument("--paragraphs", type=int, default=4)
    p.add_argument("--new", type=int, default=96, help="new tokens per prompt")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if not WIKI.exists():
        print(f"{WIKI} not found (../shared/data)", file=sys.stderr)
        return 2
    ks = sorted({0, *(int(k) for k in args.k.split(","))})
    tok = Tokenizer.from_dir(resolve("kogpt-mini"))  # its ids fit both models' vocabularies
    texts = paragraphs(args.paragraphs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            folder = resolve(name) if not name.startswith("kogpt2-") else \
                make_random_checkpoint(Path(tmp) / name, name)
            label = name if folder != Path(tmp) / name else f"{name} shape, random"
            for dtype in args.dtypes.split(","):
                model = load(folder, dtype, "cpu")
                costs = {T: forward_ms(model, T) for T in (1, 2, 3, 5, 9)}
                print(f"| {label}, {dtype} | " + " | ".join(f"{ms:.1f} ms" for ms in costs.values()) + " |", flush=True)
                for r in measure(model, tok, texts, ks, args.new, args.repeats, args.batch):
                    rows.append({"model": label, "dtype": dtype, **r})
                    print(table([rows[-1]]).splitlines()[-1], flush=True)
    print(f"\nbatch {args.batch}, {torch.get_num_threads()} threads, {args.paragraphs} prompts × {args.new} "
          f"new tokens, median of {args.repeats}\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
