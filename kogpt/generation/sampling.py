"""Choosing the next token: SamplingConfig and small pure logits processors with transformers' semantics.

Each processor maps (logits (B, V) fp32, ids (B, T)) -> logits (B, V) without mutating its inputs.
`ids` holds prompt + generated ids; ids >= V (left padding) are ignored. Order as transformers:
repetition penalty → no-repeat-ngram → bad words, then (sampling only) temperature → top-k → top-p
→ min-p → typical-p. Greedy is argmax after the penalties, never a tiny temperature.

    next_ids = sample(logits, ids, SamplingConfig(temperature=0.8), rng)   # (B,)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UserError

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SamplingError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token. temperature=0 means greedy (do_sample=False)."""

    do_sample: bool = True  # False: greedy (argmax after penalties)
    temperature: float = 1.0  # > 0 scales logits; 0 switches to greedy
    top_k: int = 50  # keep the k most likely tokens; 0 disables (transformers' default is 50)
    top_p: float = 1.0  # nucleus: smallest set with cumulative probability >= top_p; 1 disables
    min_p: float = 0.0  # drop tokens below min_p × the top token's probability; 0 disables
    typical_p: float = 1.0  # locally typical sampling mass; 1 disables
    repetition_penalty: float = 1.0  # CTRL penalty on every id seen (prompt + generated); 1 disables
    no_repeat_ngram_size: int = 0  # forbid repeating any n-gram of this size; 0 disables
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # id sequences never to generate

    def __post_init__(self):
        def check(ok: bool, msg: str):
            if not ok:
                raise SamplingError(msg)

        check(self.temperature >= 0, f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        check(0 < self.typical_p <= 1, f"typical_p must be in (0, 1], got {self.typical_p}")
        check(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        check(isinstance(self.no_repeat_ngram_size, int) and self.no_repeat_ngram_size >= 0,
              f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size}")
        words = tuple(tuple(int(i) for i in w) for w in self.bad_words_ids)
        check(all(len(w) > 0 and min(w) >= 0 for w in words), "bad_words_ids must be non-empty lists of ids >= 0")
        object.__setattr__(self, "bad_words_ids", words)
        if self.temperature == 0:
            object.__setattr__(self, "do_sample", False)

    def replace(self, **changes) -> "SamplingConfig":
        return dataclasses.replace(self, **changes)

    def penalties(self) -> list[Processor]:
        """Processors applied to greedy and sampled decoding alike."""
        out: list[Processor] = []
        if self.repetition_penalty != 1.0:
            out.append(partial(repetition_penalty, penalty=self.repetition_penalty))
        if self.no_repeat_ngram_size > 0:
            out.append(partial(no_repeat_ngram, n=self.no_repeat_ngram_size))
        if self.bad_words_ids:
            out.append(partial(bad_words, words=self.bad_words_ids))
        return out

    def warpers(self) -> list[Processor]:
        """Processors that shape the sampling distribution (sampling only)."""
        out: list[Processor] = []
        if self.temperature != 1.0:
            out.append(partial(temperature, t=self.temperature))
        if self.top_k > 0:
            out.append(partial(top_k, k=self.top_k))
        if self.top_p < 1.0:
            out.append(partial(top_p, p=self.top_p))
        if self.min_p > 0:
            out.append(partial(min_p, p=self.min_p))
        if self.typical_p < 1.0:
            out.append(partial(typical_p, mass=self.typical_p))
        return out


GREEDY = SamplingConfig(do_sample=False)


def process(logits: torch.Tensor, ids: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """The scores (B, V) fp32 the request picks from: logits after the penalties and, when sampling, the warpers."""
    logits = logits.float()
    for f in s.penalties():
        logits = f(logits, ids)
    if s.do_sample:
        for f in s.warpers():
            logits = f(logits, ids)
    return logits


def first_max(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim, ties to the first index as argmax breaks them, through max's indices:
    argmax is the slower reduction on the CPU (docs/performance.md, "The sampler's argmax")."""
    return x.max(-1).indices


def draw(probs: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
    """One id (B,) per row of probs (B, V), which need not sum to 1: argmax of p / E with E ~ Exp(1)
    (the exponential race; one pass over the vocabulary, much cheaper than torch.multinomial on CPU)."""
    return first_max(probs / torch.empty_like(probs).exponential_(1.0, generator=rng))


def sample(logits: torch.Tensor, ids: torch.Tensor, s: SamplingConfig,
           rng: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V) given the ids so far (B, T)."""
    scores = process(logits, ids, s)
    return draw(scores.softmax(-1), rng) if s.do_sample else first_max(scores)


# -- processors ---------------------------------------------------------------------------------
def temperature(logits, ids, t: float):
    return logits / t


def top_k(logits, ids, k: int):
    kth = logits.topk(min(k, logits.size(-1)), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p(logits, ids, p: float):
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove = cum <= 1 - p
    remove[..., -1] = False  # keep at least the most likely token
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def min_p(logits, ids, p: float):
    probs = logits.softmax(-1)
    remove = probs < p * probs.amax(-1, keepdim=True)
    remove = remove.scatter(-1, probs.argmax(-1, keepdim=True), False)
    return logits.masked_fill(remove, float("-inf"))


def typical_p(logits, ids, mass: float):
    logp = logits.log_softmax(-1)
    entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
    shifted, order = (-logp - entropy).abs().sort(dim=-1)
    cum = logits.gather(-1, order).softmax(-1).cumsum(-1)
    last = (cum < mass).sum(-1, keepdim=True).clamp(max=logits.size(-1) - 1)
    remove = shifted > shifted.gather(-1, last)
    remove[..., 0] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def repetition_penalty(logits, ids, penalty: float):
    """CTRL penalty on every id in `ids`: positive logits divided, negative multiplied."""
    V = logits.size(-1)
    padded = F.pad(logits, (0, 1))  # column V absorbs padding ids
    idx = ids.clamp(max=V)
    seen = padded.gather(-1, idx)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(-1, idx, seen)[..., :V]


def no_repeat_ngram(logits, ids, n: int):
    """Ban every token that would complete an n-gram already present in `ids`."""
    T, V = ids.size(-1), logits.size(-1)
    if T < n:
        return logits
    prefix = ids[:, T + 1 - n:]  # (B, n-1)
    windows = ids.unfold(1, n, 1)  # (B, T-n+1, n)
    match = (windows[..., :-1] == prefix[:, None]).all(-1)  # (B, T-n+1)
    banned = logits.new_zeros(logits.size(0), V + 1, dtype=torch.bool)
    banned.scatter_(1, torch.where(match, windows[..., -1].clamp(max=V), V), True)
    return logits.masked_fill(banned[:, :V], float("-inf"))


def bad_words(logits, ids, words: tuple[tuple[int, ...], ...]):
    """Ban the last id of each word whose other ids end `ids` (single ids: always banned)."""
    banned = torch.zeros_like(logits, dtype=torch.bool)
    V = logits.size(-1)
    for w in words:
        if w[-1] >= V:
            continue
        if len(w) == 1:
            banned[:, w[-1]] = True
        elif ids.size(-1) >= len(w) - 1:
            prefix = torch.tensor(w[:-1], device=ids.device)
            banned[:, w[-1]] |= (ids[:, ids.size(-1) - len(prefix):] == prefix).all(-1)
    return logits.masked_fill(banned, float("-inf"))
