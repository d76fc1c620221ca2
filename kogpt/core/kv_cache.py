"""Preallocated key/value cache with one length per row, for batched and continuous decoding.

Keys/values of every layer live in (n_layer, B, nh, S, hs) tensors. Each row fills its own slots
left to right, so rows of different lengths share one batch without padding: a forward over rows
`rows` (a slice) with T new tokens writes them at slots lengths[b] .. lengths[b] + T - 1 and attends
over each row's filled slots. A row is reused by setting its length back to 0 (`reset(rows)`).
`Cache` declares the three methods the model calls on any cache (prepare, update, advance); the
compiled step and PPLM steering pass stand-ins of their own.

    cache = KVCache.for_model(config, batch_size=4, max_len=256, dtype=torch.float32)
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .config import GPTConfig


@runtime_checkable
class Cache(Protocol):
    """The past keys/values of a GPT forward over cache rows `rows`, T new tokens per row.

    GPT.hidden calls prepare once, update once per layer (in layer order), then advance once.
    """

    def prepare(self, rows: slice, T: int) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Positions (B, T) of the new tokens, the attention mask (None: none needed), is_causal."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Take this layer's new k, v (B, nh, T, hs); return the keys/values to attend over (B, nh, S, hs)."""

    def advance(self) -> None:
        """Count the new tokens as part of the past (after every layer wrote)."""


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # filled slots per row
        self._rows: slice = slice(None)
        self._start: int | None = None  # common start slot when the rows' lengths are equal
        self._pos: torch.Tensor | None = None
        self._end = 0

    @classmethod
    def for_model(cls, config: GPTConfig, batch_size: int, max_len: int,
                  dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> "KVCache":
        if max_len > config.n_positions:
            raise ValueError(f"cache length {max_len} exceeds the model's n_positions {config.n_positions}")
        return cls(config.n_layer, batch_size, config.n_head, max_len, config.head_dim, dtype, device)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    def prepare(self, rows: slice, T: int) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Set up a forward of T new tokens for `rows`: positions (B, T), attention mask, is_causal.

        The mask (B|1, 1, T, end) is None when every query may see every filled slot (one new token
        with equal lengths) or when plain causal attention applies (is_causal, from empty rows).
        """
        lens = self.lengths[rows]  # (B,)
        lo, hi = int(lens.min()), int(lens.max())
        self._end = hi + T
        if self._end > self.max_len:
            raise ValueError(f"KV cache full: {self._end} positions requested, room for {self.max_len}")
        pos = lens[:, None] + torch.arange(T, device=lens.device)  # (B, T)
        self._rows, self._pos, self._start = rows, pos, (lo if lo == hi else None)
        if lo == hi:
            if T == 1:
                return pos, None, False
            if lo == 0:
                return pos, None, True
        k_slots = torch.arange(self._end, device=lens.device)  # (end,)
        mask = k_slots[None, None, :] <= pos[:, :, None]  # (B, T, end): a query sees its row's slots up to itself
        return pos, mask[:, None], False  # (B, 1, T, end)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at the prepared slots; return this layer's keys/values (B, nh, end, hs)."""
        rows = self._rows
        if self._start is not None:  # equal lengths: one contiguous write
            s = self._start
            self.k[layer, rows, :, s:s + k.size(2)] = k
            self.v[layer, rows, :, s:s + v.size(2)] = v
        else:
            b = torch.arange(self.batch_size, device=k.device)[rows][:, None]  # (B, 1)
            self.k[layer, b, :, self._pos] = k.transpose(1, 2)  # indexed view is (B, T, nh, hs)
            self.v[layer, b, :, self._pos] = v.transpose(1, 2)
        return self.k[layer, rows, :, :self._end], self.v[layer, rows, :, :self._end]

    def advance(self) -> None:
        """Count the prepared tokens as filled (called once per forward, after every layer wrote)."""
        self.lengths[self._rows] = self._pos[:, -1] + 1

    def select(self, rows: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Rebuild the batch from existing rows: new row r is a copy of old row rows[r], cut to lengths[r]
        when given (e.g. one prefilled prompt copied once per continuation to score)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]  # (n_layer, R, nh, S, hs)
        self.lengths = (self.lengths[rows] if lengths is None else lengths).clone()

    def reset(self, rows: slice = slice(None)) -> None:
        """Empty rows so they can take a new sequence."""
        self.lengths[rows] = 0

    def truncate(self, row: int, length: int) -> None:
        """Forget row `row`'s slots past `length` (speculative decoding drops rejected drafts)."""
        self.lengths[row] = length
