"""An optional torch.compile'd decode step: the Engine's StepFn with fixed shapes.

The eager step (generate.decode_step) reads row lengths into Python ints to slice the cache, which
would make the compiler guard on and recompile for every length. This step instead writes each row's
new key/value at its length with a scatter and attends over all cache slots under a mask, so one
decode token for every cache row is one graph with the same shapes at every step: compiled once per
cache shape (batch rows × slots; both marked dynamic, so a new prompt length does not recompile),
and replayable as a CUDA graph on GPU (`mode="reduce-overhead"`). It reuses the model's own modules
through a stand-in for KVCache; the eager step stays the default.

    engine = Engine(model, slots=4, step_fn=CompiledStep())
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache
from .model import GPT


class _StaticCache:
    """KVCache's forward interface for one new token per row over every slot, without Python ints."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor):
        self.k, self.v, self.lengths = k, v, lengths  # (L, B, nh, S, hs), (L, B, nh, S, hs), (B,)

    def prepare(self, rows: slice, T: int):
        pos = self.lengths[:, None]  # (B, 1): the new token's slot and position
        slots = torch.arange(self.k.size(3), device=pos.device)
        mask = (slots[None, :] <= pos)[:, None, None, :]  # (B, 1, 1, S): a row sees its filled slots and itself
        return pos, mask, False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        B, nh, _, hs = k.shape
        at = self.lengths.view(B, 1, 1, 1).expand(B, nh, 1, hs)
        self.k[layer].scatter_(2, at, k)
        self.v[layer].scatter_(2, at, v)
        return self.k[layer], self.v[layer]

    def advance(self) -> None:  # lengths move outside the graph
        pass


def _step(model: GPT, tok: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return model(tok, _StaticCache(k, v, lengths))[:, -1]  # (B, V)


class CompiledStep:
    """A StepFn (see generate.StepFn) running `_step` through torch.compile; same logits as decode_step."""

    def __init__(self, mode: str | None = None, backend: str = "inductor"):
        self.fn = torch.compile(_step, mode=mode, backend=backend, fullgraph=True)

    def __call__(self, model: GPT, tok: torch.Tensor, cache: KVCache, rows: slice) -> torch.Tensor:
        n = tok.size(0)
        if rows.start not in (0, None) or n > cache.batch_size:
            raise ValueError("CompiledStep decodes cache rows [0, n)")
        B = cache.batch_size
        if n < B:  # rows past n are free (length 0): they decode a dummy token that nothing keeps
            tok = torch.cat([tok, tok.new_zeros(B - n, 1)])
        model.rope(cache.lengths[:1, None])  # GPT-J: (re)build the rotary table outside the graph
        torch._dynamo.mark_dynamic(cache.k, 3)
        torch._dynamo.mark_dynamic(cache.v, 3)
        logits = self.fn(model, tok, cache.k, cache.v, cache.lengths)
        cache.lengths[:n] += 1
        return logits[:n]
