"""Evaluation: perplexity of text files, few-shot classification by label log-likelihood, finetuned heads.

Perplexity and few-shot rest on one primitive, continuation_logprobs(): each context is prefilled
once into a KV-cache row, the row is copied for each continuation, and all continuations are scored
in one cached forward — so a few-shot prompt is computed once for all its label words. Perplexity
slides a window over each document and scores every token once. A finetuned classifier is scored
with its own head instead (classifier.py), no prompts. Results are JSON-ready dicts.

    result = evaluate_fewshot(gpt, get_task("nsmc"), examples, pool=train, shots=5, seed=0)
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data.corpus import read_documents as document_units
from ..data.corpus import scan
from ..errors import UserError
from ..core.kv_cache import KVCache
from ..core.model import GPT
from .tasks import Example, Task

_LM_HEAD_CHUNK = 2048  # positions per lm_head call: bounds the (N, vocab) logits in memory


# -- scoring -------------------------------------------------------------------------------------
def _batch_fits(model: GPT, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]]) -> bool:
    # padded continuation tokens take positions up to the longest context + the longest continuation
    longest = max(len(c) for conts in continuations for c in conts)
    return max(map(len, contexts)) + longest <= model.config.n_positions


@torch.inference_mode()
def continuation_logprobs(model: GPT, contexts: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[Sequence[int]]]) -> list[list[float]]:
    """log p(continuation | context) in nats — the sum over its tokens — for each continuation of each context.

    contexts[b] (non-empty) is run once; continuations[b] lists its continuations (each non-empty),
    scored together from copies of that context's cache row. The longest context plus the longest
    continuation must fit the model's n_positions.
    """
    cfg, device = model.config, model.wte.weight.device
    rows = [(b, c) for b, conts in enumerate(continuations) for c in conts]
    if any(not c for _, c in rows) or any(not c for c in contexts):
        raise ValueError("contexts and continuations must be non-empty")
    if not _batch_fits(model, contexts, continuations):
        raise ValueError(f"the longest context + continuation exceeds the model's {cfg.n_positions} positions")
    n_ctx = torch.tensor([len(c) for c in contexts], device=device)  # (B,)
    ctx, T = _right_pad(contexts, device)  # (B, T)
    cont, Tc = _right_pad([c for _, c in rows], device)  # (R, Tc)
    cache = KVCache.for_model(cfg, len(contexts), T + Tc - 1, model.wte.weight.dtype, device)
    h = model.hidden(ctx, cache)  # (B, T, C); causal, so the right padding never reaches a real token
    last = h[torch.arange(len(contexts), device=device), n_ctx - 1]  # (B, C) at each context's last token
    src = torch.tensor([b for b, _ in rows], device=device)  # (R,) context of each continuation
    total = model.lm_head(last).float().log_softmax(-1)[src, cont[:, 0]].double()  # (R,) first tokens
    if Tc > 1:
        # one cache row per continuation, cut back to its context: the padding slots get overwritten
        cache.select(src, n_ctx[src])
        h = model.hidden(cont[:, :-1], cache)  # (R, Tc-1, C)
        lens = torch.tensor([len(c) for _, c in rows], device=device)
        real = torch.arange(1, Tc, device=device) < lens[:, None]  # (R, Tc-1): target cont[:, t+1] is real
        h, targets = h[real], cont[:, 1:][real]  # (N, C), (N,)
        row_of = torch.arange(len(rows), device=device)[:, None].expand_as(real)[real]  # (N,)
        for i in range(0, len(targets), _LM_HEAD_CHUNK):
            logp = model.lm_head(h[i:i + _LM_HEAD_CHUNK]).float().log_softmax(-1)  # (n, V)
            total.index_add_(0, row_of[i:i + _LM_HEAD_CHUNK],
                             logp.gather(-1, targets[i:i + _LM_HEAD_CHUNK, None])[:, 0].double())
    out, it = [], iter(total.tolist())
    for conts in continuations:
        out.append([next(it) for _ in conts])
    return out


def _right_pad(seqs: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, int]:
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids.to(device), T


def score_all(model: GPT, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]],
              batch_size: int = 8, desc: str = "scoring") -> list[list[float]]:
    """continuation_logprobs over many contexts, up to batch_size contexts per forward, with a progress bar.

    Contexts are batched by length (little padding); results come back in the input order.
    """
    order = sorted(range(len(contexts)), key=lambda i: (len(contexts[i]), max(map(len, continuations[i]))))
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] + [i] if batches and len(batches[-1]) < batch_size else None
        if batch and _batch_fits(model, [contexts[j] for j in batch], [continuations[j] for j in batch]):
            batches[-1] = batch
        else:
            batches.append([i])
    out: list[list[float]] = [[] for _ in contexts]
    with tqdm(total=len(order), desc=desc, unit="ctx", disable=None, leave=False) as bar:
        for batch in batches:
            res = continuation_logprobs(model, [contexts[j] for j in batch], [continuations[j] for j in batch])
            for j, r in zip(batch, res):
                out[j] = r
            bar.update(len(batch))
    return out


def start_id(tokenizer) -> int:
    """The token every scored text follows: Tokenizer.start_id (BOS, else EOS), which must exist."""
    if tokenizer.start_id is None:
        raise UserError("the tokenizer has neither a BOS nor an EOS token to start a text with")
    return tokenizer.start_id


def _limits(model: GPT, max_length: int | None) -> int:
    n = model.config.n_positions
    if max_length is None:
        return n
    if not 2 <= max_length <= n:
        raise UserError(f"--max-length must be in [2, {n}] (the model's context), got {max_length}")
    return max_length


# -- perplexity ----------------------------------------------------------------------------------
def read_documents(path: str | os.PathLike) -> list[str]:
    """The documents of a text file as `kogpt prepare` reads them (kogpt.data.corpus): a blank line ends a
    document, a file without blank lines holds one per line; lines NFC, stripped, joined by newlines."""
    return ["\n".join(units) for units, _ in document_units(scan(Path(path)))]


def sliding_windows(ids: Sequence[int], window: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(context, targets) pieces that score ids[1:] exactly once, each piece at most `window` tokens.

    The first piece is ids[:window]; each next one moves `stride` tokens on and keeps the previous
    window - stride tokens as context (as transformers' perplexity guide).
    """
    if not 1 <= stride < window:
        raise UserError(f"the stride must be in [1, {window - 1}] (below the window), got {stride}")
    end = min(window, len(ids))
    out = [(list(ids[:1]), list(ids[1:end]))] if len(ids) > 1 else []
    while end < len(ids):
        new_end = min(end + stride, len(ids))
        out.append((list(ids[new_end - window:end]), list(ids[end:new_end])))
        end = new_end
    return out


def evaluate_perplexity(gpt, documents: Sequence[str], *, max_length: int | None = None, stride: int | None = None,
                        batch_size: int = 8) -> dict:
    """Bits per UTF-8 byte, bits per character and token perplexity of `documents`.

    Each document is scored after the start token (start_id) in windows of max_length tokens
    (default: the model's context) moving by `stride` (default: half the window). The end-of-text
    token is not scored; bytes and characters are those of the documents as given.
    """
    window = _limits(gpt.model, max_length)
    stride = window // 2 if stride is None else stride
    start = start_id(gpt.tokenizer)
    pieces: list[tuple[int, list[int], list[int]]] = []
    for d, ids in enumerate(gpt.tokenizer.encode_batch(list(documents))):
        pieces += [(d, c, t) for c, t in sliding_windows([start, *ids], window, stride)]
    scores = score_all(gpt.model, [c for _, c, _ in pieces], [[t] for _, _, t in pieces], batch_size, "perplexity")
    per_doc = [{"doc": d, "tokens": 0, "bytes": len(text.encode()), "chars": len(text), "nats": 0.0}
               for d, text in enumerate(documents)]
    for (d, _, targets), [nats] in zip(pieces, scores):
        per_doc[d]["tokens"] += len(targets)
        per_doc[d]["nats"] -= nats
    nats, tokens = sum(p["nats"] for p in per_doc), sum(p["tokens"] for p in per_doc)
    nbytes, chars = sum(p["bytes"] for p in per_doc), sum(p["chars"] for p in per_doc)
    if not tokens:
        raise UserError("no tokens to score: the documents are empty")
    metrics = {"bits_per_byte": nats / math.log(2) / nbytes, "bits_per_char": nats / math.log(2) / chars,
               "token_perplexity": math.exp(nats / tokens), "nats_per_token": nats / tokens}
    return {"model": gpt.name, "task": "perplexity", "kogpt_version": __version__, "max_length": window,
            "stride": stride, "n": len(documents), "tokens": tokens, "bytes": nbytes, "chars": chars,
            "metrics": metrics, "predictions": per_doc}


# -- few-shot classification ----------------------------------------------------------------------
def sample_shots(pool: Sequence[Example], k: int, rng: random.Random, query: Example) -> list[Example]:
    """k examples of `pool` drawn without replacement, never one with the query's text."""
    if k == 0:
        return []
    picked = rng.sample(range(len(pool)), min(len(pool), k + 8))  # spares for copies of the query
    shots = [pool[i] for i in picked if (pool[i].text, pool[i].text_pair) != (query.text, query.text_pair)]
    return shots[:k]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_choices(tokenizer, task: Task, prompt: str, start: int) -> tuple[list[int], list[list[int]]]:
    """The shared context ids and each choice's continuation ids for one prompt.

    prompt + " " + choice is encoded whole, so each answer is tokenized as in running text; the
    context is the longest prefix that the prompt and every prompt + choice encode to (the whole
    prompt with these templates: the answer starts at a space).
    """
    prompt_ids, *whole = tokenizer.encode_batch([prompt] + [prompt + c for c in task.continuations()])
    n = min(_common_prefix(prompt_ids, w) for w in whole)
    if any(len(w) == n for w in whole):
        raise UserError(f"a label word of {task.name} vanishes into the prompt when tokenized")
    return [start, *prompt_ids[:n]], [w[n:] for w in whole]


def evaluate_fewshot(gpt, task: Task, examples: Sequence[Example], *, pool: Sequence[Example] = (), shots: int = 0,
                     seed: int = 0, batch_size: int = 8, max_length: int | None = None) -> dict:
    """Few-shot in-context classification of `examples` by the log-likelihood of each label word.

    Example i gets `shots` demonstrations drawn from `pool` with random.Random(f"{seed}/{i}") — the
    same shots whatever --limit is. When a prompt does not fit max_length (default: the model's context),
    shots are dropped from the front until it fits, then the oldest tokens; the count is reported.
    """
    if shots and not pool:
        raise UserError("--shots needs --fewshot-data: a file to draw demonstrations from")
    limit = _limits(gpt.model, max_length)
    start = start_id(gpt.tokenizer)
    contexts, conts, used, truncated = [], [], [], 0
    for i, ex in enumerate(tqdm(examples, desc="prompts", disable=None, leave=False)):
        demos = sample_shots(pool, shots, random.Random(f"{seed}/{i}"), ex)
        while True:
            ctx, cs = encode_choices(gpt.tokenizer, task, task.prompt(ex, demos), start)
            room = limit - max(map(len, cs))
            if room < 1:
                raise UserError(f"a label word of {task.name} takes {limit - room} tokens: no room in {limit}")
            if len(ctx) <= room or not demos:
                break
            demos = demos[1:]
        if len(ctx) > room:
            truncated += 1
            ctx = ctx[len(ctx) - room:]
        contexts.append(ctx)
        conts.append(cs)
        used.append([d.id for d in demos])
    scores = score_all(gpt.model, contexts, conts, batch_size, task.name)
    preds = [task.predict(s) for s in scores]
    records = []
    for ex, p, shot_ids in zip(examples, preds, used):
        rec = {"id": ex.id, "gold": ex.label, "pred": p.label, "logprobs": list(p.logprobs), "shot_ids": shot_ids}
        if task.scored:
            rec.update(gold_score=ex.score, pred_score=p.score)
        records.append(rec)
    return {"model": gpt.name, "task": task.name, "method": "few-shot", "prompt_version": task.prompt_version,
            "kogpt_version": __version__, "choices": list(task.choices), "seed": seed, "shots": shots,
            "n": len(examples), "max_length": limit, "shots_dropped": sum(shots - len(u) for u in used),
            "truncated": truncated, "metrics": task.metrics(examples, preds), "predictions": records}


# -- finetuned classifiers ------------------------------------------------------------------------
def evaluate_finetuned(model, head, tokenizer, task: Task, examples: Sequence[Example], *, batch_size: int = 32,
                       name: str = "kogpt") -> dict:
    """`examples` classified (or scored 0–5) by a finetuned classifier's own head: no prompts, no shots.

    The head must have the task's outputs (its labels, or one score for the STS tasks); a KorSTS
    model can score KLUE-STS and back. Pairs are read in both orders and averaged, as in training.
    """
    from .classifier import check_head, predict

    check_head(head, task, name)
    preds = predict(model, head, tokenizer, examples, batch_size)
    records = []
    for ex, p in zip(examples, preds):
        rec = {"id": ex.id, "gold": ex.label, "pred": p.label}
        if head.regression:
            rec.update(gold_score=ex.score, pred_score=p.score)
        else:
            rec["logprobs"] = list(p.logprobs)
        records.append(rec)
    return {"model": name, "task": task.name, "method": "finetuned", "prompt_version": None,
            "input_format": head.input_format, "finetuned_on": head.task, "labels": list(head.labels),
            "kogpt_version": __version__, "seed": None, "shots": 0, "n": len(examples), "seq_len": head.seq_len,
            "metrics": task.metrics(examples, preds), "predictions": records}


# -- reporting -----------------------------------------------------------------------------------
def markdown_table(results: Sequence[dict]) -> str:
    """A Markdown table with one row per result (few-shot metrics ×100, as the model cards print them)."""
    names = list(dict.fromkeys(k for r in results for k in r["metrics"]))
    head = ["model", "task", "prompt", "shots", "n", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        scale = 1 if r["task"] == "perplexity" else 100
        prompt = r.get("prompt_version") or ("finetuned head" if r.get("method") == "finetuned" else "-")
        cells = [r["model"], r["task"], prompt, str(r.get("shots", "-")), str(r["n"])]
        cells += [_fmt(r["metrics"].get(k), scale) for k in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v: float | None, scale: float) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v * scale:.2f}" if scale != 1 else f"{v:.4f}"


def json_ready(obj):
    """`obj` with NaN floats replaced by None (JSON has no NaN; a constant prediction has no correlation)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_ready(v) for v in obj]
    return obj
