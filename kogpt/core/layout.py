"""How a loaded model sits in memory: the dtype of its floats and the kind of its linear layers.

The loader (kogpt.hf.load) builds the model on the meta device and streams each tensor of the file
into it: floats are cast to the layout's dtype, and each Linear becomes `make_linear(weight, bias)` as
soon as its weight (and bias) are read, so no float copy of the whole model exists in any layout.
A new per-layer transform is one more builder in LINEARS and its name in core/dtypes.py. LoRA
(core/lora.py) is orthogonal to the linear kind: the layout's `lora` wraps the targeted linears, frozen and
of the layout's kind, in fresh LoRALinear adapters; the others stay the layout's kind.

    layout = Layout.parse("int8")  # int8 linears over bf16; Layout(torch.float32): plain fp32, for training
    layout = Layout.parse("int4-g64")  # int4 linears (64 inputs a group) over bf16
    layout = Layout(torch.bfloat16, lora=LoRAConfig(r=8))  # frozen bf16 base, fp32 adapters
"""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import UserError
from .dtypes import INT4_GROUP, INT8, LONG, NAMES, int4_group, long_name, torch_dtype
from .int4 import Int4Linear, check_group
from .int8 import Int8Linear, fbgemm_available
from .lora import LoRAConfig, LoRALinear
from .packed import PackedLinear, can_pack


@contextmanager
def on_meta():
    """Build modules on the meta device, skipping the init of weights that are about to be replaced:
    it costs nothing there, but the first meta normal_ imports torch's reference ops (~1.5 s, ~150 MB).
    The init skip is a torch function mode, so it is local to this thread."""
    with torch.device("meta"), _SkipInit():
        yield


class _SkipInit(torch.overrides.TorchFunctionMode):
    _INIT = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_,
             torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_, torch.nn.init.zeros_,
             torch.nn.init.ones_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._INIT:
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


# -- the linear layers: (weight (out, in), bias or None, layout) -> module -----------------------------
def _plain(weight: torch.Tensor, bias: torch.Tensor | None, layout) -> nn.Linear:
    layer = nn.Linear.__new__(nn.Linear)  # nn.Linear's __init__ would make (and init) weights to throw away
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = weight.size(1), weight.size(0)
    # a weight that is already a Parameter (the embeddings, for a tied head) stays that very Parameter
    layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
    layer.bias = None if bias is None else nn.Parameter(bias)
    return layer


def _int8(kernel: str):
    return lambda weight, bias, layout: Int8Linear.from_float(weight, bias, layout.dtype, kernel)


LINEARS = {
    "plain": _plain,  # nn.Linear: trains, compiles, exports
    "packed": lambda weight, bias, layout: PackedLinear(weight, bias),  # oneDNN blocked weights (CPU bf16/fp16)
    "int8": _int8("int8pack"),  # int8 weights × bf16 inputs (weight-only)
    "int8-dynamic": _int8("fbgemm"),  # int8 weights and inputs (fbgemm, CPU)
    # groupwise int4 weights × bf16 inputs (weight-only), every linear, the LM head and classifier heads included
    "int4": lambda weight, bias, layout: Int4Linear.from_float(weight, bias, layout.dtype, layout.group),
}


@dataclass(frozen=True)
class Layout:
    """The dtype of a loaded model's floats (None: the checkpoint's own) and the kind of its linears
    (a key of LINEARS), and the LoRA adapters its targeted linears get (None: no LoRA); `group`: the inputs
    per scale of int4 linears. Layout(torch.float32) is plain fp32: what training, torch.compile and export use."""

    dtype: torch.dtype | None = None
    linear: str = "plain"
    lora: LoRAConfig | None = None
    group: int = INT4_GROUP

    def __post_init__(self):
        check_group(self.group)

    @classmethod
    def parse(cls, name: str | torch.dtype | None = "auto", plain: bool = False) -> "Layout":
        """The inference layout of a --dtype name (core/dtypes.NAMES, a long name like bfloat16, or a torch
        dtype): the fastest linears for it. plain: nn.Linear only (what torch.compile can trace)."""
        if isinstance(name, torch.dtype):
            name = long_name(name)
        name = name or "auto"
        group = int4_group(name)
        if name in INT8 or group is not None:
            if plain:
                raise UserError(f"--compile works with fp32, bf16 and fp16 weights, not {name}")
            return cls(torch.bfloat16, name) if group is None else cls(torch.bfloat16, "int4", group=group)
        if name not in NAMES and name not in LONG.values():
            raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(NAMES)}")
        return cls(None if name == "auto" else torch_dtype(name), "plain" if plain else "packed")

    def resolve(self, dtype: torch.dtype, device: str | torch.device) -> "Layout":
        """This layout for a checkpoint of `dtype` on `device`: the dtype fixed, "packed" only where oneDNN
        applies (else plain), "int8-dynamic" only on a CPU build with fbgemm (else weight-only int8)."""
        dtype, linear = self.dtype or dtype, self.linear
        if linear == "packed" and not can_pack(device, dtype):
            linear = "plain"
        if linear == "int8-dynamic":
            if torch.device(device).type != "cpu":
                raise UserError("--dtype int8-dynamic runs on the CPU only (fbgemm); use int8 or bf16 on a GPU")
            if not fbgemm_available():
                warnings.warn("this PyTorch build has no fbgemm: int8-dynamic falls back to weight-only int8",
                              stacklevel=3)
                linear = "int8"
        return dataclasses.replace(self, dtype=dtype, linear=linear)

    def make_linear(self, weight: torch.Tensor, bias: torch.Tensor | None, name: str = "",
                    family: str = "gpt2") -> nn.Module:
        """The final layer of this layout for a Linear's weight (out, in) and bias, both already in self.dtype:
        a LoRALinear when the layout's LoRA targets `name` (e.g. `h.0.attn.qkv`) in a model of `family`."""
        adapted = self.lora.adapts(name, family) if self.lora else None
        if adapted:
            return LoRALinear(LINEARS[self.linear](weight, bias, self), self.lora, *adapted)
        return LINEARS[self.linear](weight, bias, self)
