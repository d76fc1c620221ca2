"""LoRA: a frozen Linear plus a trainable low-rank update, `y = base(x) + B(A(dropout(x))) * alpha / r`.

The math and the init are PEFT's (A kaiming-uniform, B zeros, so a new adapter changes nothing). The base
weight stays in the loaded dtype (bf16 when asked) and never trains; A and B are fp32. GPT-J's `attn.qkv`
is HF's q_proj, k_proj and v_proj fused, so there it holds one A/B pair per adapted slice (`groups`=3):
the same parameters, and the same logits, as PEFT's three adapters. core/layout.py builds these layers
while the model loads; kogpt.hf.peft reads and writes them as PEFT adapter folders.

    layout = Layout(torch.bfloat16, lora=LoRAConfig.parse("attn,mlp", r=8, alpha=16))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

MODULES = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")  # the linears LoRA can adapt (kogpt names)
SLICES = ("attn.q", "attn.k", "attn.v")  # GPT-J only: one projection of the fused attn.qkv
_KINDS = {"attn": ("attn.qkv", "attn.proj"), "mlp": ("mlp.fc", "mlp.proj"),
          "qkv": ("attn.qkv",), "fc": ("mlp.fc",), "proj": ("attn.proj", "mlp.proj"),
          "q": ("attn.q",), "k": ("attn.k",), "v": ("attn.v",)}


@dataclass(frozen=True)
class LoRAConfig:
    """Rank, alpha, dropout and the adapted modules (a sorted tuple of MODULES and SLICES names)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = MODULES

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise UserError(f"--lora-r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise UserError(f"--lora-alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in MODULES + SLICES]
        if unknown or not self.targets:
            raise UserError(f"unknown LoRA target {unknown[0] if unknown else '(none)'!r}")

    @classmethod
    def parse(cls, targets: str = "", r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> "LoRAConfig":
        """targets: comma-separated kinds (`attn`, `mlp`), kogpt names (`qkv`, `proj`, `fc`, `mlp.proj`, ...) or,
        for GPT-J, `q`, `k`, `v`; empty: every attention and MLP projection."""
        names: set[str] = set()
        for t in (t.strip() for t in targets.split(",")):
            if t:
                if t not in _KINDS and t not in MODULES:
                    raise UserError(f"unknown --lora-targets entry {t!r}; use attn, mlp or names among "
                                    f"{', '.join(MODULES)} (q, k, v for GPT-J)")
                names.update(_KINDS.get(t, (t,)))
        if "attn.qkv" in names:
            names -= set(SLICES)
        return cls(r, float(alpha), float(dropout), tuple(sorted(names)) if names else MODULES)

    def adapts(self, name: str, family: str) -> tuple[int, tuple[int, ...]] | None:
        """(groups, adapted slices) of the linear called `name` (e.g. `h.0.attn.qkv`) in a model of this family,
        or None when it stays a plain Linear."""
        module = ".".join(name.split(".")[-2:])
        if module == "attn.qkv":
            slices = tuple(i for i, s in enumerate(SLICES) if s in self.targets)
            if "attn.qkv" in self.targets:
                return (3, (0, 1, 2)) if family == "gptj" else (1, (0,))
            if slices and family != "gptj":
                raise UserError("GPT-2 computes q, k and v in one layer (c_attn): use --lora-targets qkv")
            return (3, slices) if slices else None
        return (1, (0,)) if module in self.targets else None


class LoRALinear(nn.Module):
    """A frozen (out, in) weight and bias plus lora_A (n·r, in) and lora_B (n, out/groups, r) in fp32, n the
    number of adapted slices among `groups` equal row blocks of the output."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, cfg: LoRAConfig,
                 groups: int = 1, slices: tuple[int, ...] = (0,)):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.r, self.alpha, self.scaling, self.dropout = cfg.r, cfg.alpha, cfg.alpha / cfg.r, cfg.dropout
        self.groups, self.slices = groups, tuple(slices)
        n, device = len(self.slices), weight.device
        self.lora_A = nn.Parameter(torch.empty(n * cfg.r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(n, self.out_features // groups, cfg.r, device=device))
        with torch.no_grad():
            for a in self.lora_A.view(n, cfg.r, self.in_features):
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default init of each A

    def pair(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the k-th adapted slice's A (r, in) and B (out/groups, r): PEFT's lora_A and lora_B."""
        return self.lora_A.view(len(self.slices), self.r, self.in_features)[k], self.lora_B[k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + self.delta(x).to(y.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """B(A(dropout(x))) * alpha / r, (..., out) in fp32."""
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
        n = len(self.slices)
        a = F.linear(x.to(self.lora_A.dtype), self.lora_A).unflatten(-1, (n, self.r))  # (..., n, r)
        d = torch.einsum("...nr,nor->...no", a, self.lora_B) * self.scaling  # (..., n, out/groups)
        return self._place(d, -2).flatten(-2)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """The update the adapter adds to the weight, (out, in) in fp32: what merging adds."""
        A = self.lora_A.view(len(self.slices), self.r, self.in_features)  # (n, r, in)
        d = torch.einsum("nor,nri->noi", self.lora_B, A) * self.scaling  # (n, out/groups, in)
        return self._place(d, 0).flatten(0, 1)  # (out, in)

    def merged_weight(self) -> torch.Tensor:
        """The weight with the update folded in, in the weight's dtype."""
        return (self.weight.float() + self.delta_weight()).to(self.weight.dtype)

    def _place(self, d: torch.Tensor, dim: int) -> torch.Tensor:
        """d with its adapted slices put among `groups` blocks along dim (zeros where no slice is adapted)."""
        if len(self.slices) == self.groups:
            return d
        shape = list(d.shape)
        shape[dim] = self.groups
        index = torch.tensor(self.slices, device=d.device)
        return d.new_zeros(shape).index_copy(dim % d.dim(), index, d)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, slices={self.slices}/{self.groups}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
