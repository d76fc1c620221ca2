"""Scoring continuations with the model: log p(continuation | context), many at once.

continuation_logprobs() prefills each context once into a KV-cache row, copies the row for each of
its continuations and scores them all in one cached forward, so a few-shot prompt is computed once for
all its label words. score_all() batches many contexts by length. Perplexity and few-shot rest on it.

    [[lp_yes, lp_no]] = continuation_logprobs(model, [ctx_ids], [[yes_ids, no_ids]])
"""

from __future__ import annotations

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


def context_length(model: GPT, max_length: int | None) -> int:
    """Tokens a scored sequence may take: max_length (checked against the model) or its whole context."""
    n = model.config.n_positions
    if max_length is None:
        return n
    if not 2 <= max_length <= n:
        raise UserError(f"--max-length must be in [2, {n}] (the model's context), got {max_length}")
    return max_length
