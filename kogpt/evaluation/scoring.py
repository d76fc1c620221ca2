"""Scoring continuations with the model: log p(continuation | context), many at once.

continuation_logprobs() prefills each context once into a KV-cache row, copies the row for each of
its continuations and scores them all in one cached forward, so a few-shot prompt is computed once for
all its label words. score_all() batches many contexts by length. Perplexity and few-shot rest on it;
continuation_scores() gives the same scores token by token (with top-k alternatives), and
prompt_scores() the per-token logprobs of whole texts that `kogpt serve` answers `echo` with.

    [[lp_yes, lp_no]] = continuation_logprobs(model, [ctx_ids], [[yes_ids, no_ids]])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..core.kv_cache import KVCache
from ..core.model import GPT
from ..errors import UserError

_LM_HEAD_CHUNK = 2048  # positions per lm_head call: bounds the (N, vocab) logits in memory


def _batch_fits(model: GPT, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]]) -> bool:
    # padded continuation tokens take positions up to the longest context + the longest continuation
    longest = max(len(c) for conts in continuations for c in conts)
    return max(map(len, contexts)) + longest <= model.config.n_positions


@dataclass(frozen=True)
class TokenScores:
    """One continuation's score token by token: log p(token | everything before it), in nats."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]]  # per token, the top_k (id, logprob) alternatives, best first

    @property
    def total(self) -> float:
        return math.fsum(self.logprobs)


def continuation_logprobs(model: GPT, contexts: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[Sequence[int]]]) -> list[list[float]]:
    """log p(continuation | context) in nats — the sum over its tokens — for each continuation of each context.

    contexts[b] (non-empty) is run once; continuations[b] lists its continuations (each non-empty),
    scored together from copies of that context's cache row. The longest context plus the longest
    continuation must fit the model's n_positions.
    """
    return [[s.total for s in row] for row in continuation_scores(model, contexts, continuations)]


@torch.inference_mode()
def continuation_scores(model: GPT, contexts: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[Sequence[int]]], top_k: int = 0) -> list[list[TokenScores]]:
    """continuation_logprobs token by token, with each position's top_k alternatives (the one implementation)."""
    cfg, device = model.config, model.wte.weight.device
    rows = [(b, c) for b, conts in enumerate(continuations) for c in conts]
    if any(not c for _, c in rows) or any(not c for c in contexts):
        raise ValueError("contexts and continuations must be non-empty")
    if not _batch_fits(model, contexts, continuations):
        raise ValueError(f"the longest context + continuation exceeds the model's {cfg.n_positions} positions")
    n_ctx = torch.tensor([len(c) for c in contexts], device=device)  # (B,)
    ctx, T = _right_pad(contexts, device)  # (B, T)
    cont, Tc = _right_pad([c for _, c in rows], device)  # (R, Tc)
    lens = torch.tensor([len(c) for _, c in rows], device=device)  # (R,)
    real = torch.arange(Tc, device=device) < lens[:, None]  # (R, Tc): cont[:, t] is a real token
    lp = torch.zeros(len(rows), Tc, device=device)  # (R, Tc) log p of each continuation token
    k = min(top_k, cfg.vocab_size)
    top_lp = torch.zeros(len(rows), Tc, k, device=device)  # (R, Tc, k)
    top_id = torch.zeros(len(rows), Tc, k, dtype=torch.long, device=device)

    def score(at: torch.Tensor, h: torch.Tensor, targets: torch.Tensor) -> None:
        # log_softmax of h's logits, _LM_HEAD_CHUNK positions at a time; written to the (row, t) pairs `at`
        for i in range(0, len(targets), _LM_HEAD_CHUNK):
            where = at[i:i + _LM_HEAD_CHUNK]
            logp = model.lm_head(h[i:i + _LM_HEAD_CHUNK]).float().log_softmax(-1)  # (n, V)
            lp[where[:, 0], where[:, 1]] = logp.gather(-1, targets[i:i + _LM_HEAD_CHUNK, None])[:, 0]
            if k:
                top = logp.topk(k, dim=-1)
                top_lp[where[:, 0], where[:, 1]], top_id[where[:, 0], where[:, 1]] = top.values, top.indices

    cache = KVCache.for_model(cfg, len(contexts), T + Tc - 1, model.wte.weight.dtype, device)
    h = model.hidden(ctx, cache)  # (B, T, C); causal, so the right padding never reaches a real token
    last = h[torch.arange(len(contexts), device=device), n_ctx - 1]  # (B, C) at each context's last token
    src = torch.tensor([b for b, _ in rows], device=device)  # (R,) context of each continuation
    score(torch.stack([torch.arange(len(rows), device=device), torch.zeros_like(src)], -1), last[src], cont[:, 0])
    if Tc > 1:
        # one cache row per continuation, cut back to its context: the padding slots get overwritten
        cache.select(src, n_ctx[src])
        h = model.hidden(cont[:, :-1], cache)  # (R, Tc-1, C): position t predicts cont[:, t+1]
        nxt = real[:, 1:]  # (R, Tc-1)
        score(nxt.nonzero() + torch.tensor([0, 1], device=device), h[nxt], cont[:, 1:][nxt])
    lp_rows, top_lp, top_id = lp.tolist(), top_lp.tolist(), top_id.tolist()
    scores = [TokenScores(lp_rows[r][:n], [list(zip(top_id[r][t], top_lp[r][t])) for t in range(n)] if k else [])
              for r, n in enumerate(lens.tolist())]
    out, it = [], iter(scores)
    for conts in continuations:
        out.append([next(it) for _ in conts])
    return out


def prompt_scores(model: GPT, seqs: Sequence[Sequence[int]], top_k: int = 0,
                  batch_size: int = 8) -> list[TokenScores]:
    """Each token of each sequence after its first, given the tokens before it: the `echo` logprobs of a
    server (the first token has no context, so no score). Sequences of one token get empty scores."""
    long = [i for i, s in enumerate(seqs) if len(s) > 1]
    out = [TokenScores([], []) for _ in seqs]
    contexts, conts = [seqs[i][:1] for i in long], [[seqs[i][1:]] for i in long]
    for batch in _batches(model, contexts, conts, batch_size):
        res = continuation_scores(model, [contexts[j] for j in batch], [conts[j] for j in batch], top_k)
        for j, r in zip(batch, res):
            out[long[j]] = r[0]
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
    batches = _batches(model, contexts, continuations, batch_size)
    out: list[list[float]] = [[] for _ in contexts]
    with tqdm(total=len(contexts), desc=desc, unit="ctx", disable=None, leave=False) as bar:
        for batch in batches:
            res = continuation_logprobs(model, [contexts[j] for j in batch], [continuations[j] for j in batch])
            for j, r in zip(batch, res):
                out[j] = r
            bar.update(len(batch))
    return out


def _batches(model: GPT, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]],
             batch_size: int) -> list[list[int]]:
    """Indices of the contexts, sorted by length (little padding) into batches that fit the model."""
    order = sorted(range(len(contexts)), key=lambda i: (len(contexts[i]), max(map(len, continuations[i]))))
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] + [i] if batches and len(batches[-1]) < batch_size else None
        if batch and _batch_fits(model, [contexts[j] for j in batch], [continuations[j] for j in batch]):
            batches[-1] = batch
        else:
            batches.append([i])
    return batches


def start_id(tokenizer) -> int:
    """The token every scored text follows: Tokenizer.start_id (BOS, else EOS), which must exist."""
    if tokenizer.start_id is None:
        raise UserError("the tokenizer has neither a BOS nor an EOS token to start a text with")
    return tokenizer.start_id


def context_length(model: GPT, max_length: int | None) -> int:
    """Tokens a scored sequence may take: max_length (checked against the model) or its whole context."""
    n = model.config.n_positions
    if max_length is None:
        return n
    if not 2 <= max_length <= n:
        raise UserError(f"--max-length must be in [2, {n}] (the model's context), got {max_length}")
    return max_length
