"""Few-shot in-context classification: each label word scored by its log-likelihood after a prompt.

A task (tasks/) writes the prompt from the query and demonstrations drawn from a pool; every
choice is a continuation of the same context, scored together (scoring.py), and the task turns the
log-likelihoods into a label (or a 0–5 score) and its metrics. Results are JSON-ready dicts.

    result = evaluate_fewshot(gpt, get_task("nsmc"), examples, pool=train, shots=5, seed=0)
"""

from __future__ import annotations

import random
from typing import Sequence

from tqdm.auto import tqdm

from .. import __version__
from ..errors import UserError
from .scoring import context_length, score_all, start_id
from .tasks import Example, Task


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
    limit = context_length(gpt.model, max_length)
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
