"""Many LoRA adapters over one base model in one batch: which adapter each engine row decodes with.

`AdapterRouter` watches the model's forwards: for a forward over cache rows `rows` of an engine's KV
cache it sets core/lora.ROUTE from the adapter names those rows were assigned, so every adapter's layers
update only their own rows while the base forward runs once for all. A request picks its adapter with
the `UseAdapter` hook, which assigns its row when the engine admits it and frees it when it ends; the
decode loop knows nothing about adapters. Forwards outside an engine (scoring) set ROUTE with `routed`.

    router = AdapterRouter(model); Request(ids, 32, hooks=[UseAdapter(router, "chat")])
"""

from __future__ import annotations

import threading
import weakref

import torch

from ..core.kv_cache import KVCache
from ..core.lora import ROUTE
from .hooks import RequestHook


class AdapterRouter:
    """The adapter name of each row of each engine's cache, applied to the model's cached forwards."""

    def __init__(self, model: torch.nn.Module):
        self.rows: weakref.WeakKeyDictionary[KVCache, list[str | None]] = weakref.WeakKeyDictionary()
        self._tokens = threading.local()  # per thread: the ROUTE tokens of the forwards under way
        model.register_forward_pre_hook(self._enter, with_kwargs=True)
        model.register_forward_hook(self._exit, always_call=True)

    def assign(self, cache: KVCache, row: int, name: str | None) -> None:
        """Row `row` of `cache` decodes with adapter `name` from now on (None: the base alone)."""
        self.rows.setdefault(cache, [None] * cache.batch_size)[row] = name

    def route(self, names: list[str | None], device) -> dict[str, torch.Tensor | slice]:
        """ROUTE for a batch whose rows use `names`: each adapter's row indices, slice(None) for all rows."""
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            if name is not None:
                groups.setdefault(name, []).append(i)
        return {name: slice(None) if len(rows) == len(names) else torch.tensor(rows, device=device)
                for name, rows in groups.items()}

    def _enter(self, module, args, kwargs):
        cache = args[1] if len(args) > 1 else kwargs.get("cache")
        rows = args[2] if len(args) > 2 else kwargs.get("rows", slice(None))
        names = self.rows.get(cache) if isinstance(cache, KVCache) else None
        token = None
        if names is not None:
            token = ROUTE.set(self.route(names[rows], cache.k.device))
        self._stack().append(token)

    def _exit(self, module, args, output):
        token = self._stack().pop()
        if token is not None:
            ROUTE.reset(token)

    def _stack(self) -> list:
        if not hasattr(self._tokens, "stack"):
            self._tokens.stack = []
        return self._tokens.stack


class UseAdapter(RequestHook):
    """Decode this request with adapter `name` (one the router's model has; see kogpt.api.KoGPT.add_adapter)."""

    per_step = False  # acts only when the row is taken and freed: the request may still speculate

    def __init__(self, router: AdapterRouter, name: str):
        self.router, self.name = router, name
        self.place: tuple[KVCache, int] | None = None

    def admit(self, cache: KVCache, row: int) -> None:
        self.place = (cache, row)
        self.router.assign(cache, row, self.name)

    def finish(self) -> None:
        if self.place is not None:
            self.router.assign(*self.place, None)
            self.place = None
