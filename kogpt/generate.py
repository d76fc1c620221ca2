"""THE decode loop: prefill the prompts, then one cached step per token. Every caller uses it.

Works on ids only (prompt formats, stop strings and detokenizing belong to callers). Prompts of
different lengths are left-padded; positions count real tokens only, and padded cache slots are
masked, so each row generates exactly what it would alone. Rows stop on an EOS id, on their own
token budget, or when the caller's `stop(row, token)` says so.

    for ev in generate(model, [ids], max_new_tokens=32, sampling=GREEDY): print(ev.token)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .errors import UserError
from .kv_cache import KVCache
from .model import GPT
from .sampling import GREEDY, SamplingConfig, sample

StepFn = Callable[[GPT, torch.Tensor, torch.Tensor, KVCache], torch.Tensor]


@dataclass(frozen=True)
class Event:
    row: int  # index of the prompt
    token: int  # the new id (an EOS id when finish == "stop" because of EOS)
    finish: str | None = None  # None while the row continues; "stop" (EOS or stop()) or "length"
    is_eos: bool = False


def prefill(model: GPT, ids: torch.Tensor, pad: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the (left-padded) prompts ids (B, T) through the model; next-token logits (B, V)."""
    pos = ((~pad).cumsum(1) - 1).clamp(min=0)  # (B, T): positions count real tokens only
    cache.set_padding(pad)
    return model(ids, cache, pos, last_only=True)[:, -1]


def decode_step(model: GPT, tok: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One cached step: tok (B, 1) at positions pos (B, 1); next-token logits (B, V)."""
    return model(tok, cache, pos)[:, -1]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, T) and pad mask (B, T) for prompts right-aligned at T = the longest prompt."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    pad = torch.ones(len(prompts), T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        pad[b, T - len(p):] = False
    return ids.to(device), pad.to(device)


@torch.inference_mode()
def generate(model: GPT, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
             sampling: SamplingConfig = GREEDY, eos_ids: Sequence[int] = (), rng: torch.Generator | None = None,
             stop: Callable[[int, int], bool] | None = None, pad_id: int = 0,
             step_fn: StepFn = decode_step) -> Iterator[Event]:
    """Yield an Event per new token of each row, in step order; the last event of a row has `finish`.

    max_new_tokens: one budget for all rows or one per row; capped so prompt + new tokens fit the
    model's context (n_positions). stop(row, token) -> True ends that row with finish "stop".
    """
    cfg = model.config
    B = len(prompts)
    budgets = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if B == 0:
        return
    if len(budgets) != B:
        raise ValueError("max_new_tokens needs one budget per prompt")
    for b, p in enumerate(prompts):
        if not p:
            raise UserError(f"prompt {b} is empty; give at least one token (e.g. the BOS id)")
        if len(p) >= cfg.n_positions:
            raise UserError(f"prompt {b} has {len(p)} tokens; the model's context is {cfg.n_positions}")
        budgets[b] = max(0, min(budgets[b], cfg.n_positions - len(p)))
    device = model.wte.weight.device
    ids, pad = left_pad(prompts, pad_id, device)
    T = ids.size(1)
    steps = max(budgets)
    if steps == 0:
        for b in range(B):
            yield Event(b, -1, "length")
        return
    cache = KVCache.for_model(cfg, B, min(T + steps, cfg.n_positions), model.wte.weight.dtype, device)
    history = ids.masked_fill(pad, cfg.vocab_size)  # (B, T); padding ids >= V are ignored by processors
    pos = (~pad).sum(1, keepdim=True) - 1  # (B, 1) position of each row's last token
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    active = [budgets[b] > 0 for b in range(B)]
    for b in range(B):
        if not active[b]:
            yield Event(b, -1, "length")
    logits = prefill(model, ids, pad, cache)
    for step in range(steps):
        tok = sample(logits, history, sampling, rng)  # (B,)
        is_eos = torch.isin(tok, eos).tolist() if len(eos) else [False] * B
        toks = tok.tolist()
        for b in range(B):
            if not active[b]:
                continue
            finish = None
            if is_eos[b] or (stop is not None and stop(b, toks[b])):
                finish = "stop"
            elif step + 1 >= budgets[b]:
                finish = "length"
            if finish:
                active[b] = False
            yield Event(b, toks[b], finish, is_eos[b])
        if not any(active):
            return
        history = torch.cat([history, tok[:, None]], 1)
        pos = pos + 1
        logits = step_fn(model, tok[:, None], pos, cache)


def generate_ids(model: GPT, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
                 sampling: SamplingConfig = GREEDY, eos_ids: Sequence[int] = (),
                 rng: torch.Generator | None = None) -> list[list[int]]:
    """The new ids of each prompt (an ending EOS id included, as transformers returns it)."""
    out: list[list[int]] = [[] for _ in prompts]
    for ev in generate(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                       eos_ids=eos_ids, rng=rng):
        if ev.token >= 0:
            out[ev.row].append(ev.token)
    return out
