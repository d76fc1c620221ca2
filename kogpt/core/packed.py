"""Prepacked oneDNN linear layers: the fast CPU layout for bf16/fp16 decoding.

PyTorch's default CPU linear for bf16 streams weights well below the memory bandwidth at batch 1;
the same weights reordered once into oneDNN's blocked layout (`mkldnn._reorder_linear_weight`) and
applied with `mkldnn._linear_pointwise` stream ~1.4× faster (17 vs 12 GB/s on the 2-core AVX-512
machine `kogpt bench` reports on). Packed weights are an
inference layout (no training; inputs that need gradients, as in PPLM steering, take a dense
copy of the weight); state_dict() still yields the plain `weight`/`bias`, so a packed
model saves like any other. The loader makes these layers (core/layout.py, "packed").

    layer = PackedLinear(weight, bias)  # weight (out, in) bf16 or fp16 on the CPU
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def can_pack(device: torch.device | str, dtype: torch.dtype) -> bool:
    """oneDNN packing applies to CPU bf16/fp16 weights when PyTorch was built with oneDNN."""
    return (torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)  # blocked layout, tuned for batch 1
        self.register_buffer("bias", None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:  # gradients w.r.t. the input (PPLM steering): the dense weight, differentiably
            return F.linear(x, self.packed.to_dense(), self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # the dense weight, as nn.Linear has it
        destination[prefix + "weight"] = self.packed.to_dense()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN packed"

