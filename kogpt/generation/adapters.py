"""Many LoRA adapters over one base model in one batch: which adapter each engine row decodes with.

`AdapterRouter` watches the model's forwards: for a forward over cache rows `rows` of an engine's KV
cache it sets core/lora.ROUTE to the adapter index of each of those rows, so every LoRABank updates each
row with its own adapter while the base forward runs once for all. A request picks its adapter with the
`UseAdapter` hook, which assigns its row when the engine admits it and frees it when it ends; the decode
loop knows nothing about adapters. Forwards outside an engine (scoring) set ROUTE with core/lora.routed.

    router = AdapterRouter(model); Request(ids, 32, hooks=[UseAdapter(router, 0)])
"""

from __future__ import annotations

import threading
import weakref

import torch

from ..core.kv_cache import KVCache
from ..core.lora import ROUTE
from .hooks import RequestHook


class AdapterRouter:
    """The adapter index of each row of each engine's cache (-1: the base), applied to the model's cached
    forwards."""

    def __init__(self, model: torch.nn.Module):
        self.rows: weakref.WeakKeyDictionary[KVCache, torch.Tensor] = weakref.WeakKeyDictionary()
        self._tokens = threading.local()  # per thread: the ROUTE tokens of the forwards under way
        model.register_forward_pre_hook(self._enter, with_kwargs=True)
        model.register_forward_hook(self._exit, always_call=True)

    def assign(self, cache: KVCache, row: int, index: int) -> None:
        """Row `row` of `cache` decodes with adapter `index` from now on (-1: the base alone)."""
        if cache not in self.rows:
            self.rows[cache] = torch.full((cache.batch_size,), -1, dtype=torch.long, device=cache.k.device)
        self.rows[cache][row] = index

    def _enter(self, module, args, kwargs):
        cache = args[1] if len(args) > 1 else kwargs.get("cache")
        rows = args[2] if len(args) > 2 else kwargs.get("rows", slice(None))
        ids = self.rows.get(cache) if isinstance(cache, KVCache) else None
        self._stack().append(None if ids is None else ROUTE.set(ids[rows]))

    def _exit(self, module, args, output):
        token = self._stack().pop()
        if token is not None:
            ROUTE.reset(token)

    def _stack(self) -> list:
        if not hasattr(self._tokens, "stack"):
            self._tokens.stack = []
        return self._tokens.stack


class UseAdapter(RequestHook):
    """Decode this request with adapter `index` (see kogpt.api.KoGPT.add_adapter)."""

    per_step = False  # acts only when the row is taken and freed: the request may still speculate

    def __init__(self, router: AdapterRouter, index: int):
        self.router, self.index = router, index
        self.place: tuple[KVCache, int] | None = None

    def admit(self, cache: KVCache, row: int) -> None:
        self.place = (cache, row)
        self.router.assign(cache, row, self.index)

    def finish(self) -> None:
        if self.place is not None:
            self.router.assign(*self.place, -1)
            self.place = None
