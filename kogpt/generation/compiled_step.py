"""An optional torch.compile'd decode step: the Engine's StepFn with fixed shapes.

The eager step (engine.decode_step) reads row lengths into Python ints to slice the cache, which
would make the compiler guard on and recompile for every length. This step instead writes each row's
new key/value at its length (kv_write, in place) and attends over all cache slots under a mask, so
one decode token for every cache row is one graph: the cache length is marked dynamic (a new prompt
length does not recompile; a new number of rows does). It reuses the model's own modules through a
Cache of its own (core/kv_cache.py); the eager step stays the default. On the CPU it compiles with
inductor's freezing (the weights become constants: inductor packs the linears for oneDNN / MKL and fuses
the small ops around them; a second, packed copy of the weights) and its C++ wrapper; both are set only
around this step's own calls (dynamo reads freezing while tracing, so `torch.compile(options=...)` would
not do). On a GPU it asks for CUDA graphs (`mode="reduce-overhead"`, the cache at a static address);
that path has no GPU to run on here.

    engine = Engine(model, slots=4, step_fn=CompiledStep())
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import UserError
from ..core.kv_cache import KVCache
from ..core.model import GPT


@torch.library.custom_op("kogpt::kv_write", mutates_args=("cache",))
def kv_write(cache: torch.Tensor, layer: int, lengths: torch.Tensor, new: torch.Tensor) -> None:
    """cache (L, B, nh, S, hs)[layer, b, :, lengths[b]] = new (B, nh, 1, hs)[b, :, 0], in place. An opaque op
    that declares what it mutates, so the compiler neither copies the cache nor reorders around it."""
    b = torch.arange(new.size(0), device=new.device)
    cache[layer, b, :, lengths] = new[:, :, 0]


class _StaticCache:
    """A Cache for one new token per row over every slot, without Python ints."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor):
        self.k, self.v, self.lengths = k, v, lengths  # (L, B, nh, S, hs), (L, B, nh, S, hs), (B,)

    def prepare(self, rows: slice, T: int):
        pos = self.lengths[:, None]  # (B, 1): the new token's slot and position
        slots = torch.arange(self.k.size(3), device=pos.device)
        mask = (slots[None, :] <= pos)[:, None, None, :]  # (B, 1, 1, S): a row sees its filled slots and itself
        return pos, mask, False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        kv_write(self.k, layer, self.lengths, k)
        kv_write(self.v, layer, self.lengths, v)
        return self.k[layer], self.v[layer]

    def advance(self) -> None:  # lengths move outside the graph
        pass


def _step(model: GPT, tok: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return model(tok, _StaticCache(k, v, lengths))[:, -1]  # (B, V)


class CompiledStep:
    """A StepFn (see engine.StepFn) running `_step` through torch.compile; same logits as decode_step."""

    def __init__(self, mode: str | None = None, backend: str = "inductor"):
        self.fn = torch.compile(_step, mode=mode, backend=backend, fullgraph=True)
        # made once: entering a reused patch costs ~10 µs a step; the settings are thread-local
        self.cpu_config = torch._inductor.config.patch(freezing=True, cpp_wrapper=True)

    def __call__(self, model: GPT, tok: torch.Tensor, cache: KVCache, rows: slice) -> torch.Tensor:
        n = tok.size(0)
        if (rows.start or 0) != 0 or rows.step not in (None, 1) or rows.stop != n or n > cache.batch_size:
            raise ValueError("CompiledStep decodes cache rows [0, n) with one token each")
        if int(cache.lengths[:n].max()) >= cache.max_len:
            raise ValueError(f"KV cache full: room for {cache.max_len} positions")
        B = cache.batch_size
        if n < B:  # rows past n are free (length 0): they decode a dummy token that nothing keeps
            tok = torch.cat([tok, tok.new_zeros(B - n, 1)])
        model.rope(cache.lengths[:1, None])  # GPT-J: (re)build the rotary table outside the graph
        for t in (cache.k, cache.v):
            torch._dynamo.mark_dynamic(t, 3)
            if t.is_cuda:
                torch._dynamo.mark_static_address(t)  # CUDA graphs may then write it in place
        try:
            with self.cpu_config if not cache.k.is_cuda else contextlib.nullcontext():
                logits = self.fn(model, tok, cache.k, cache.v, cache.lengths)
        except (torch._dynamo.exc.TorchDynamoException, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"--compile: torch.compile failed ({first}); run without --compile") from e
        cache.lengths[:n] += 1
        return logits[:n]
