"""The optimizer and learning-rate schedule of kogpt training, and the FLOP count behind MFU.

AdamW with nanoGPT's weight-decay rule: every parameter of 2+ dimensions (matmul weights and the
embeddings, the tied wte/lm_head included) decays; biases and LayerNorm gains do not. The schedule
is a pure function of the step (linear warmup, then cosine to min_lr), so resuming needs only the
step. MFU follows the PaLM appendix: 6N FLOPs per token plus 12·L·C·T for attention.

    opt = make_optimizer(model, lr=6e-4, weight_decay=0.1); set_lr(opt, lr_at(step, ...))
"""

from __future__ import annotations

import math
import time

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():  # each shared (tied) parameter once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW over decay / no-decay groups; the fused kernel when the parameters are plain tensors."""
    groups = param_groups(model, weight_decay)
    plain = all(type(p.data) is torch.Tensor for g in groups for p in g["params"])  # not FSDP's DTensors
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=plain or None)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6N + 12·L·C·T, N without position embeddings."""
    n = config.num_params() - (config.n_positions * config.n_embd if config.family == "gpt2" else 0)
    return 6 * n + 12 * config.n_layer * config.n_embd * seq_len


def measure_peak_flops(dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                       n: int = 2048, trials: int = 5, seconds: float = 0.2) -> float:
    """FLOP/s of a large square matmul in `dtype` (best of a few trials: shared machines are noisy),
    the attainable peak that MFU is measured against. It leaves the global RNG alone (a resumed run's
    dropout masks must not move)."""
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b  # warm up
    best = 0.0
    for _ in range(trials):
        sync()
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best
