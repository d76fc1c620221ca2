"""Preallocated key/value cache for incremental decoding.

One tensor pair for all layers, (n_layer, B, nh, S, hs), filled left to right: the model writes
the keys/values of T new positions at slots [length, length + T) and attends over [0, length + T).
`pad` marks slots that hold left padding (batched prompts of different lengths) so no query sees them.

    cache = KVCache.for_model(config, batch_size=1, max_len=256, dtype=torch.float32)
"""

from __future__ import annotations

import torch

from .config import GPTConfig


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.pad: torch.Tensor | None = None  # (B, S) bool, True where a slot holds padding

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

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) after the filled slots; return this layer's keys/values so far."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions requested, room for {self.max_len}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """Mark n more slots as filled (called once per forward, after every layer wrote)."""
        self.length += n

    def set_padding(self, pad: torch.Tensor) -> None:
        """pad: (B, T0) bool for the first T0 slots (left padding of the prompts)."""
        full = torch.zeros(self.batch_size, self.max_len, dtype=torch.bool, device=self.k.device)
        full[:, : pad.size(1)] = pad
        self.pad = full if pad.any() else None

    def reset(self) -> None:
        self.length = 0
        self.pad = None
