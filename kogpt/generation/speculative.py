"""Exact speculative decoding without a second model: prompt-lookup drafts and their verification.

`draft` proposes the next k ids of a sequence by finding its longest recent n-gram tail earlier in its
own history (prompt + generated) and copying what followed (prompt-lookup decoding, as transformers'
`prompt_lookup_num_tokens` and vLLM's ngram speculator). The Engine feeds the last id and the draft
through one forward (k + 1 logits); `verify` keeps the drafted ids the request's own sampler would have
produced and adds one id from the model, so the output is exactly the plain sampler's: greedy accepts
while a draft equals the argmax; sampling accepts draft x with probability p(x) (a deterministic draft is
a point mass) and on rejection draws from p with x removed (Leviathan et al. 2023, Chen et al. 2023).

    emitted = verify(logits, history, draft_ids, sampling, rng)   # accepted drafts + one model token
"""

from __future__ import annotations

from typing import Sequence

import torch

from .sampling import SamplingConfig, draw, first_max, process

MAX_NGRAM = 3  # longest tail searched for; longer tails pick better continuations, rarer matches
MIN_NGRAM = 1  # shortest tail that may still propose a draft


def draft(history: Sequence[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """The k ids that followed the most recent earlier occurrence of the longest tail n-gram of `history`
    (n from max_ngram down to min_ngram), or [] when no tail recurs. A continuation that runs into the
    tail keeps copying itself, so a loop of period p < k still drafts k ids."""
    n_hist = len(history)
    if k <= 0:
        return []
    for n in range(min(max_ngram, n_hist - 1), min_ngram - 1, -1):
        tail = list(history[n_hist - n:])
        last = tail[-1]
        i = n_hist - n - 1  # candidate start; the occurrence must end before the tail does
        while i >= 0:
            if history[i + n - 1] == last and list(history[i:i + n]) == tail:
                out: list[int] = []
                for j in range(k):
                    src = i + n + j
                    out.append(history[src] if src < n_hist else out[src - n_hist])
                return out
            i -= 1
    return []


def verify(logits: torch.Tensor, history: Sequence[int], drafted: Sequence[int], s: SamplingConfig,
           rng: torch.Generator | None = None) -> list[int]:
    """The ids to emit: the accepted prefix of `drafted`, then one id from the model (the argmax or a draw
    where the first draft was rejected, else after the last draft).

    logits: (len(drafted) + 1, V), row i predicting the id after history + drafted[:i]. Row i goes through
    the request's processors with history + drafted[:i] as its ids, as the plain loop would, and only once
    drafts 0..i-1 are kept (a top-p sort per row costs as much as the forward on a small model).
    """
    seq = torch.tensor([list(history) + list(drafted)], device=logits.device)  # (1, T)

    def scores(i: int) -> torch.Tensor:  # (1, V): what the plain loop picks from after history + drafted[:i]
        return process(logits[i:i + 1], seq[:, :len(history) + i] if s.penalties() else seq[:, :0], s)

    for i, d in enumerate(drafted):
        if not s.do_sample:
            best = int(first_max(scores(i)))
            if best != d:  # the first draft that is not the argmax: the argmax comes instead
                return list(drafted[:i]) + [best]
            continue
        probs = scores(i).softmax(-1)
        if float(torch.rand((), generator=rng, device=logits.device)) >= float(probs[0, d]):  # kept w.p. p(d)
            return list(drafted[:i]) + [int(draw(probs.index_fill(-1, seq.new_tensor([d]), 0.0), rng)[0])]
    last = scores(len(drafted))  # every draft kept: one more id after them
    return list(drafted) + [int(draw(last.softmax(-1), rng)[0]) if s.do_sample else int(first_max(last))]
