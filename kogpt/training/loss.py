"""The causal-LM training loss, with the lm_head matmul and cross-entropy fused (no fp32 logits).

Plain autocast training casts the (B·T, V) bf16 logits to fp32 for log_softmax and runs softmax
again in backward: on CPU those passes over B·T·V floats cost about as much as the model's own
matmuls. Here the forward computes, in row chunks that stay in cache, each row's loss and its
logit gradient (softmax − one-hot, one exp per logit), and the two gradient matmuls right away;
backward only scales them. A frozen head (LoRA) gets no weight gradient, which saves the second
matmul. Precision is autocast's: bf16 logits and logit gradients, fp32
softmax. (Liger-Kernel's fused linear cross-entropy does the same on GPU.)

    loss = LMLoss(model)(batch)  # batch (B, T+1) → mean next-token cross-entropy (nats)
"""

from __future__ import annotations

import torch
import torch.nn as nn

_CHUNK = {"cpu": 8}  # rows per softmax chunk: 8 × V fp32 stays in L2 (V up to ~32k); GPUs take 4096


def _rows(logits: torch.Tensor, targets: torch.Tensor, grad: bool) -> torch.Tensor:
    """Per-row cross-entropy (N,) in fp32 of logits (N, V); with grad, logits becomes softmax − one-hot."""
    out = torch.empty(len(targets), dtype=torch.float32, device=logits.device)
    n = _CHUNK.get(logits.device.type, 4096)
    for s in range(0, len(targets), n):
        z = logits[s:s + n].float()  # (n, V)
        t = targets[s:s + n, None]  # (n, 1)
        m = z.amax(-1, keepdim=True)
        picked = z.gather(1, t)
        z.sub_(m).exp_()
        total = z.sum(-1, keepdim=True)
        out[s:s + n] = (m + total.log() - picked).squeeze(1)
        if grad:
            z.div_(total).scatter_add_(1, t, torch.full_like(picked, -1.0))
            logits[s:s + n] = z
    return out


class _LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(h_i · Wᵀ + b, target_i), the gradients autograd needs computed in forward."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, dtype):
        w = weight.to(dtype)
        logits = h.to(dtype) @ w.T  # (N, V)
        if bias is not None:
            logits += bias.to(dtype)
        loss = _rows(logits, targets, grad=True).mean()
        g = logits  # now softmax − one-hot, (N, V) in dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        ctx.save_for_backward((g @ w).to(h.dtype) if need_h else None,
                              (g.T @ h.to(dtype)).to(weight.dtype) if need_w else None,
                              g.sum(0, dtype=torch.float32).to(bias.dtype) if need_b else None)
        ctx.n = len(targets)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out / ctx.n
        return tuple(None if g is None else g * scale for g in (grad_h, grad_w, grad_b)) + (None, None)


@torch.compiler.disable  # eager: inductor would unroll the chunk loop into a slower graph
def linear_cross_entropy(h: torch.Tensor, head: nn.Linear, targets: torch.Tensor, reduction: str = "mean"):
    """Cross-entropy of head(h) (N, C) against targets (N,): the mean, or per-token losses ('none')."""
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    with torch.autocast(dev, enabled=False):
        if reduction == "mean" and torch.is_grad_enabled():
            return _LinearCrossEntropy.apply(h, head.weight, head.bias, targets, dtype)
        logits = h.to(dtype) @ head.weight.to(dtype).T  # (N, V)
        if head.bias is not None:
            logits += head.bias.to(dtype)
        rows = _rows(logits, targets, grad=False)
        return rows.mean() if reduction == "mean" else rows


class LMLoss(nn.Module):
    """model + next-token loss in one forward, so DDP/FSDP/torch.compile wrap the whole step."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """batch (B, T+1) → the mean loss, or per-row mean losses (B,) with reduction 'none'."""
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T) each
        h = self.model.hidden(x)  # (B, T, C)
        loss = linear_cross_entropy(h.flatten(0, 1), self.model.lm_head, y.flatten(), reduction)
        return loss if reduction == "mean" else loss.view(y.shape).mean(1)
