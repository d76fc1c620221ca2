"""One GPT for both Korean GPT families, with an incremental KV-cache forward.

GPT-2 (KoGPT2): learned positions, sequential residual (ln_1 → attn, ln_2 → mlp), biased linears,
tied head. GPT-J (KoGPT): interleaved rotary on the first `rotary_dim` dims of q and k, parallel
residual from one LayerNorm, bias-free attention, untied lm_head with bias. Both use HF `gelu_new`.
Parameter names are kogpt's own (`h[i].attn.qkv`, ...); convert.py maps them to and from HF.
Dropout (HF's embd/attn/resid_pdrop at one rate) is off unless `set_dropout` turns it on for training;
it is not part of the config and acts only in train mode.

    logits = GPT(GPTConfig.preset("tiny-gpt2"))(idx)          # (B, T, vocab_size)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import GPTConfig
from .kv_cache import Cache


def rope_table(n_positions: int, rotary_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (n_positions, rotary_dim // 2) in fp32, as HF GPT-J computes them."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device) / rotary_dim))
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float32, device=device), inv_freq.float())
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """x: (B, nh, T, hs); cos, sin: (B, 1, T, rotary_dim // 2)."""
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = x_rot[..., 0::2].float(), x_rot[..., 1::2].float()  # GPT-J rotates pairs (2i, 2i+1), not halves
    rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)  # (B, nh, T, rd)
    return torch.cat((rot.to(x.dtype), x_pass), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        bias = cfg.family == "gpt2"  # GPT-J has no bias on q/k/v/out
        self.layer, self.n_head, self.rope_dim = layer, cfg.n_head, cfg.rope_dim
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=bias)
        self.dropout = 0.0

    def forward(self, x, rope, mask, causal: bool, cache: Cache | None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if rope is not None:
            q = apply_rope(q, *rope, self.rope_dim)
            k = apply_rope(k, *rope, self.rope_dim)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, S, hs)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return F.dropout(self.proj(y), p) if p else self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_dim)
        self.proj = nn.Linear(cfg.mlp_dim, cfg.n_embd)
        self.dropout = 0.0

    def forward(self, x):
        y = self.proj(F.gelu(self.fc(x), approximate="tanh"))  # HF gelu_new
        return F.dropout(y, self.dropout) if self.dropout and self.training else y


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.parallel_residual = cfg.family == "gptj"
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, layer)
        if not self.parallel_residual:
            self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, causal, cache):
        h = self.ln_1(x)
        if self.parallel_residual:  # GPT-J: one LayerNorm feeds both branches
            return x + self.attn(h, rope, mask, causal, cache) + self.mlp(h)
        x = x + self.attn(h, rope, mask, causal, cache)  # GPT-2
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.family == "gpt2":
            self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.family == "gptj")
        self.tie_weights()
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.dropout = 0.0
        self.grad_checkpoint = False  # training: recompute each block's activations in backward
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight

    def set_dropout(self, p: float) -> None:
        """Drop this share of the embeddings, attention weights and residual branches in train mode."""
        for m in self.modules():
            if isinstance(m, (GPT, Attention, MLP)):
                m.dropout = p

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin (B, 1, T, rotary_dim // 2) for positions pos (B, T); None for gpt2."""
        if self.config.family != "gptj":
            return None
        if self._rope is None or not torch.compiler.is_compiling() and (  # compiled steps build it eagerly first
                self._rope[0].device != pos.device
                or (self._rope[0].is_inference() and not torch.is_inference_mode_enabled())):  # autograd can't save it
            self._rope = rope_table(self.config.n_positions, self.config.rope_dim, pos.device)
        cos, sin = self._rope
        return cos[pos][:, None], sin[pos][:, None]  # (B, 1, T, rd/2)

    def hidden(self, idx: torch.Tensor, cache: Cache | None = None, rows: slice = slice(None)) -> torch.Tensor:
        """Final hidden states (B, T, C) after ln_f.

        With a cache, idx continues the sequences held in cache rows `rows` (each at its own length).
        """
        B, T = idx.shape
        if cache is None:
            if T > self.config.n_positions:
                raise ValueError(f"sequence of {T} tokens exceeds n_positions {self.config.n_positions}")
            pos = torch.arange(T, device=idx.device).expand(B, T)  # (B, T)
            mask, causal = None, True
        else:
            pos, mask, causal = cache.prepare(rows, T)
        x = self.wte(idx)  # (B, T, C)
        if self.config.family == "gpt2":
            x = x + self.wpe(pos)
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
        rope = self.rope(pos)
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for block in self.h:
            if recompute:  # keep only each block's input; its activations are recomputed in backward
                x = checkpoint(block, x, rope, mask, causal, cache, use_reentrant=False)
            else:
                x = block(x, rope, mask, causal, cache)
        if cache is not None:
            cache.advance()
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, cache: Cache | None = None, rows: slice = slice(None),
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab_size), or (B, 1, vocab_size) with last_only (prefill for decoding)."""
        x = self.hidden(idx, cache, rows)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)
