"""Per-request hooks: how a feature of one request (PPLM steering, a logit mask, ...) joins the decode loop.

A Request carries a sequence of RequestHooks; the Engine calls them around the request's row of the
shared KV cache and knows nothing else about them. A hook overrides only what it needs (the
defaults do nothing) and serves one request. If it raises, that request alone ends with finish
"error". A request without hooks costs the loop one truthiness check per step.

    class Ban(RequestHook):
        def map_logits(self, logits): return logits.index_fill(0, banned_ids, float("-inf"))
    Request(ids, 32, hooks=[Ban()])
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..core.kv_cache import KVCache
from ..core.model import GPT


class RequestHook:
    """What the Engine calls for one request, in order: admit when it gets its cache row, start once
    its prompt is in, before_step and map_logits around each forward that gives the row's next-token logits, and
    finish once however the request ends (stop, length, cancel or error, even in start)."""

    # True: the prompt's last token goes through the first decode step (before_step, forward,
    # map_logits) instead of the prefill, so before_step acts on the first new token too (PPLM).
    steps_last_prompt_token: bool = False
    # False: the hook acts only in admit, start and finish (e.g. picking an adapter); the loop skips its
    # before_step and map_logits, and the request may speculate (a hook that steps never drafts).
    per_step: bool = True

    def admit(self, cache: KVCache, row: int) -> None:
        """The request got cache row `row`; its prompt goes in next."""

    def start(self, cache: KVCache, row: int, max_len: int) -> None:
        """The prompt is in cache row `row` (all but its last token if steps_last_prompt_token);
        the row will hold at most max_len positions."""

    def before_step(self, model: GPT, cache: KVCache, row: int, history: Sequence[int]) -> None:
        """Row `row`'s next input, history[-1], is about to go through the batched forward."""

    def map_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The row's next-token logits (V,), from the prefill or a step -> the logits it samples from.
        Hooks map in the request's order."""
        return logits

    def finish(self) -> None:
        """The request ended: free what the hook holds."""
