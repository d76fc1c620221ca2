"""int4 linear layers: 4-bit weights in groups of `group` inputs, each group with a scale and a zero point.

Asymmetric round-to-nearest per group (the torchao / gpt-fast "tinygemm" convention, whose table of
(scale, zero) pairs the kernels read): scale = (max - min) / 15 and zero = min + 8 · scale in the compute
dtype, q = round((w - zero) / scale + 8) in [0, 15], so w ≈ (q - 8) · scale + zero. Group 32 costs
4 + 32/32 = 5 bits a weight (a bf16 scale and zero per group), group 128 4.25 bits.
Kernels: on the CPU `aten._weight_int4pack_mm_for_cpu` over weights packed once by
`_convert_weight_to_int4pack_for_cpu` (it needs out_features % 16 == 0 and in_features % group == 0);
on CUDA `aten._weight_int4pack_mm` (tinygemm: bf16, out % 8, in % 128). Any other shape or device, and
inputs that need gradients (PPLM steering), use the dequantized weights in plain torch.
The loader makes these layers as it reads each weight (core/layout.py, "int4" and "int4-g64" ...).

    layer = Int4Linear.from_float(weight, bias, torch.bfloat16, group=32)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

GROUPS = (32, 64, 128)  # the group sizes kogpt offers (the CPU kernel also takes 256; torchao offers these three)
ROWS = 128  # rows quantized at a time: at 4096 inputs their fp32 copy and int32 codes (2 MiB each) stay in the
# caches through quantize_rows' passes (64 to 512 rows measured 1.2-1.5x slower); a multiple of the CPU packing's
# blocks of 64 rows (AVX-512; 32 on AVX2), so packing block by block writes the bytes packing all does
_CPU = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
_CUDA = hasattr(torch.ops.aten, "_weight_int4pack_mm")


def check_group(group: int) -> int:
    if group not in GROUPS:
        raise UserError(f"int4 group size must be one of {', '.join(map(str, GROUPS))}, got {group}")
    return group


def kernel_for(device: torch.device | str, out_features: int, in_features: int, group: int) -> str:
    """"cpu", "cuda" (the int4 kernels) or "torch" (dequantized weights) for a layer of this shape on device."""
    kind = torch.device(device).type
    if kind == "cpu" and _CPU and out_features % 16 == 0 and in_features % group == 0:
        return "cpu"
    if kind == "cuda" and _CUDA and out_features % 8 == 0 and in_features % group == 0 and in_features % 128 == 0:
        return "cuda"
    return "torch"


def quantize_rows(w: torch.Tensor, group: int, dtype: torch.dtype,
                  buffers: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int32 (out, G·group) in [0, 15], scales_and_zeros (G, out, 2) in dtype) of a float weight (out, in),
    its inputs zero-padded to G = ceil(in / group) groups: round to nearest against the stored scale and zero.
    buffers: the fp32 and int32 (out, G·group) tensors to work in and return q in (from_float reuses one pair:
    under the loader's malloc settings each new tensor is a fresh mmap, its pages faulted in again)."""
    out, n_in = w.shape
    G = -(-n_in // group)
    x, q = buffers or (torch.empty(out, G * group, device=w.device),
                       torch.empty(out, G * group, dtype=torch.int32, device=w.device))
    x.copy_(F.pad(w, (0, G * group - n_in)) if n_in % group else w)
    hi = F.max_pool1d(x.unsqueeze(0), group, group).view(out, G, 1)  # max pooling: 3x faster than aminmax here
    lo = -F.max_pool1d(x.neg_().unsqueeze(0), group, group).view(out, G, 1)  # x holds -w from here
    scale = ((hi - lo) / 15).clamp_(min=1e-6).to(dtype)
    zero = (lo + 8 * scale.float()).to(dtype)
    xg = x.view(out, G, group)
    torch.sub(-zero.float(), xg, out=xg)  # -zero - (-w): the float w - zero
    xg.div_(scale.float()).add_(8).round_().clamp_(0, 15)
    return q.copy_(x), torch.cat((scale, zero), -1).transpose(0, 1).contiguous()  # (G, out, 2)


def _pack(q: torch.Tensor, kernel: str) -> torch.Tensor:
    if kernel == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # (rows, in/2) uint8, its own order
    if kernel == "cuda":  # tinygemm's input: high nibble first, 8 inner k-tiles
        return torch.ops.aten._convert_weight_to_int4pack((q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
    return (q[:, 0::2] | q[:, 1::2] << 4).to(torch.uint8)  # (rows, in/2): even input in the low nibble


class Int4Linear(nn.Module):
    """A Linear with groupwise int4 weights (`qweight`, packed in the kernel's layout) and bf16 activations."""

    def __init__(self, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int, group: int, kernel: str, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, scales_and_zeros.size(1)
        self.group, self.kernel, self.compute_dtype = check_group(group), kernel, compute_dtype
        self.register_buffer("qweight", qweight)  # (out, in/2) uint8, or tinygemm's 4-D tiles on CUDA
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(compute_dtype))  # (G, out, 2)
        self.register_buffer("bias", None if bias is None else bias.to(compute_dtype))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype = torch.bfloat16,
                   group: int = 32) -> "Int4Linear":
        """The layer of a float weight (out, in) and bias, quantized ROWS rows at a time in one reused pair of
        buffers (quantize_rows)."""
        out, n_in = weight.shape
        kernel = kernel_for(weight.device, out, n_in, check_group(group))
        bias = None if bias is None else bias.detach()
        if kernel == "cuda":  # tinygemm's packing tiles the rows: pack them at once
            q, sz = quantize_rows(weight.detach(), group, compute_dtype)
            return cls(_pack(q, kernel), sz, bias, n_in, group, kernel, compute_dtype)
        G = -(-n_in // group)
        packed = torch.empty(out, G * group // 2, dtype=torch.uint8, device=weight.device)
        sz = torch.empty(G, out, 2, dtype=compute_dtype, device=weight.device)
        x = torch.empty(min(out, ROWS), G * group, device=weight.device)
        q = torch.empty_like(x, dtype=torch.int32)
        for i in range(0, out, ROWS):
            w = weight[i:i + ROWS].detach()
            codes, sz[:, i:i + ROWS] = quantize_rows(w, group, compute_dtype, (x[:len(w)], q[:len(w)]))
            packed[i:i + ROWS] = _pack(codes, kernel)
        return cls(packed, sz, bias, n_in, group, kernel, compute_dtype)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:  # x (N, in) in compute_dtype -> (N, out)
        if self.kernel == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.qweight, self.group,
                                                              self.scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm(x.contiguous(), self.qweight, self.group, self.scales_and_zeros)

    def dequantized(self) -> torch.Tensor:
        """The weight (out, in) in compute_dtype, as the kernel sees it."""
        if self.kernel != "torch":  # the kernels' packings are opaque: ask the kernel for W^T = I · W^T
            rows = []
            for i in range(0, self.in_features, 1024):  # 1024 rows of the identity at a time
                eye = torch.zeros(min(1024, self.in_features - i), self.in_features, dtype=self.compute_dtype,
                                  device=self.qweight.device)
                eye.diagonal(i).fill_(1)  # (r, i + r)
                rows.append(self._mm(eye))
            return torch.cat(rows).t()
        q = torch.stack((self.qweight & 15, self.qweight >> 4), -1).view(self.out_features, -1, self.group)
        s, z = self.scales_and_zeros.float().transpose(0, 1).unsqueeze(-1).unbind(-2)  # each (out, G, 1)
        w = (q.float() - 8) * s + z  # (out, G, group) in fp32, rounded once as the kernels do
        return w.flatten(1)[:, :self.in_features].to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)  # (N, in)
        if x2.requires_grad or self.kernel == "torch":
            y = F.linear(x2, self.dequantized(), self.bias)
        else:
            y = self._mm(x2)  # (N, out)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group} "
                f"({self.kernel}) x {self.compute_dtype}")
