"""int8 linear layers: int8 weights with one scale per output channel.

Symmetric per-channel rounding: w ≈ q · s with q in [-127, 127], s = max|w_row| / 127. Embeddings
and LayerNorms keep the compute dtype (bf16); a tied lm_head gets its own int8 copy.

Two kernels on CPU (measured on this project's 2-core AVX-512 machine, `kogpt bench`):
- "int8pack" (the default, `--dtype int8`): weight-only, `torch._weight_int8pack_mm` (int8 weights
  × bf16 activations); 4× fewer weight bytes than fp32, one copy of the int8 weights, and each row's
  output independent of the other rows of a batch. Prompts of PREFILL_ROWS tokens or more use the
  dequantized weights and a bf16 matmul instead (the kernel is slow for many rows).
- "fbgemm" (`--dtype int8-dynamic`): PyTorch's fbgemm dynamic linear (`quantized::linear_dynamic`):
  int8 weights prepacked once, each input quantized to int8 on the fly (one scale per call, so a row's
  rounding depends on the rows batched with it) and int32 accumulation. It streams weights ~2× faster
  than int8pack and runs prompts ~5× faster, but fbgemm keeps the unpacked weights beside the packed
  ones (twice int8's memory). Only the kernel ops are used, not the deprecated torch.ao.quantization
  flow; the input quantization adds ~1% relative output error.
Other devices, and inputs that need gradients (PPLM steering), use the dequantized weights.
The loader makes these layers as it reads each weight (core/layout.py, "int8" and "int8-dynamic").

    layer = Int8Linear.from_float(weight, bias, torch.bfloat16, kernel="fbgemm")
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

_HAS_INT8PACK = hasattr(torch, "_weight_int8pack_mm")
PREFILL_ROWS = 128  # int8pack: from this many rows (a prompt) a dequantized bf16 GEMM is faster


@functools.cache
def fbgemm_available() -> bool:
    return hasattr(torch.ops.quantized, "linear_dynamic") and "fbgemm" in torch.backends.quantized.supported_engines


@functools.cache
def _reduce_range() -> bool:
    """fbgemm without VNNI multiplies in saturating 16-bit steps: activations then use 7 bits."""
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_vnni" not in f.read()
    except OSError:
        return True


def _fbgemm_pack(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
    with warnings.catch_warnings():  # quantized tensor creation warns of its deprecation; the kernel ops stay
        warnings.simplefilter("ignore")
        qt = torch._make_per_channel_quantized_tensor(q, scales.double(), torch.zeros_like(scales, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qt, None if bias is None else bias.float())


class Int8Linear(nn.Module):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype = torch.bfloat16, kernel: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = qweight.size(1), qweight.size(0)
        self.compute_dtype = compute_dtype
        if kernel == "auto":  # weight-only: outputs independent of the other rows of a batch
            kernel = "int8pack"
        if kernel == "fbgemm" and not (qweight.device.type == "cpu" and fbgemm_available()):
            raise ValueError("the fbgemm int8 kernel needs a CPU build of PyTorch with fbgemm")
        self.kernel = kernel
        self.register_buffer("scales", scales.to(compute_dtype))  # (out,)
        self.register_buffer("bias", None if bias is None else bias.to(compute_dtype))
        self._packed = None
        if kernel == "fbgemm":  # the prepacked copy is the only copy of the weights
            self._packed = _fbgemm_pack(qweight, scales.float(), bias)
            self.register_buffer("_qweight", None)
        else:
            self.register_buffer("_qweight", qweight)  # (out, in) int8

    @property
    def qweight(self) -> torch.Tensor:
        """(out, in) int8 weights (unpacked on demand from the fbgemm layout)."""
        if self._packed is None:
            return self._qweight
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype = torch.bfloat16,
                   kernel: str = "auto") -> "Int8Linear":
        """The layer of a float weight (out, in) and bias, quantized per output channel (quantize_weight)."""
        q, scales = quantize_weight(weight.detach())
        return cls(q, scales, None if bias is None else bias.detach(), compute_dtype, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        int8pack = _HAS_INT8PACK and x2.device.type == "cpu" and x2.size(0) < PREFILL_ROWS
        if x2.requires_grad or (self._packed is None and not int8pack):
            w = self.qweight.to(self.compute_dtype) * self.scales[:, None]  # dequantized, differentiable in x
            y = F.linear(x2.to(self.compute_dtype), w, self.bias)
        elif self._packed is not None:
            y = torch.ops.quantized.linear_dynamic(x2.float(), self._packed, _reduce_range())  # bias included
        else:
            y = torch._weight_int8pack_mm(x2.to(self.compute_dtype), self._qweight, self.scales)  # (N, out)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "qweight"] = self.qweight
        destination[prefix + "scales"] = self.scales
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 ({self.kernel}) "
                f"x {self.compute_dtype}")


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scales fp32 (out,)) with w ≈ q · scales[:, None], from any float dtype."""
    scales = (w.abs().amax(1).float() / 127).clamp(min=1e-12)  # (out,)
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for i in range(0, w.size(0), 4096):  # fp32 work in row blocks: no full fp32 copy of a big matrix
        rows = slice(i, i + 4096)
        q[rows] = w[rows].to(torch.float32, copy=True).div_(scales[rows, None]).round_().clamp_(-127, 127)
    return q, scales

