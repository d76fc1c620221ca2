"""LoRA: a frozen linear layer plus a low-rank update, `y = base(x) + B(A(dropout(x))) * alpha / r`.

The math and the init are PEFT's (A kaiming-uniform, B zeros, so a new adapter changes nothing). The base
stays in the loaded layout (bf16, int8, int4, ...) and never trains; trained A and B are fp32. GPT-J's
`attn.qkv` is HF's q_proj, k_proj and v_proj fused, so there it holds one A/B pair per adapted slice
(`groups`=3): the same parameters, and the same logits, as PEFT's three adapters. core/layout.py builds
fresh ones while the model loads, and kogpt.hf.peft writes them as PEFT adapter folders. Adapters read for
inference (one, or many over one base: multi-LoRA serving) are frozen into a LoRABank per layer, where ROUTE
says which rows of a batch each one updates.

    layout = Layout(torch.bfloat16, lora=LoRAConfig.parse("attn,mlp", r=8, alpha=16))
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
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
    """A trainable adapter over a frozen linear layer of any kind (`base`): lora_A (n·r, in) and lora_B
    (n, out/groups, r) in fp32, n the number of adapted slices among `groups` equal row blocks of the output.
    What training builds (core/layout.py) and PEFT folders are written from; served adapters are LoRABank's."""

    def __init__(self, base: nn.Module, cfg: LoRAConfig, groups: int = 1, slices: tuple[int, ...] = (0,)):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.out_features, self.in_features = base.out_features, base.in_features
        self.r, self.alpha, self.scaling, self.dropout = cfg.r, cfg.alpha, cfg.alpha / cfg.r, cfg.dropout
        self.groups, self.slices = groups, tuple(slices)
        n, device = len(self.slices), _device(base)
        self.lora_A = nn.Parameter(torch.empty(n * cfg.r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(n, self.out_features // groups, cfg.r, device=device))
        with torch.no_grad():
            for a in self.lora_A.view(n, cfg.r, self.in_features):
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default init of each A

    @property
    def weight(self) -> torch.Tensor:
        """The frozen float weight under the adapter (a plain base only)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def pair(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the k-th adapted slice's A (r, in) and B (out/groups, r): PEFT's lora_A and lora_B."""
        return self.lora_A.view(len(self.slices), self.r, self.in_features)[k], self.lora_B[k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.delta(x).to(y.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """B(A(dropout(x))) * alpha / r, (..., out) in fp32."""
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
        n = len(self.slices)
        a = F.linear(x.to(self.lora_A.dtype), self.lora_A).unflatten(-1, (n, self.r))  # (..., n, r)
        d = torch.einsum("...nr,nor->...no", a, self.lora_B) * self.scaling  # (..., n, out/groups)
        return place(d, -2, self.slices, self.groups).flatten(-2)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """The update the adapter adds to the weight, (out, in) in fp32: what merging adds."""
        A = self.lora_A.view(len(self.slices), self.r, self.in_features)  # (n, r, in)
        d = torch.einsum("nor,nri->noi", self.lora_B, A) * self.scaling  # (n, out/groups, in)
        return place(d, 0, self.slices, self.groups).flatten(0, 1)  # (out, in)

    def merged_weight(self) -> torch.Tensor:
        """The weight with the update folded in, in the weight's dtype."""
        return (self.weight.float() + self.delta_weight()).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, slices={self.slices}/{self.groups}"


def place(d: torch.Tensor, dim: int, slices: tuple[int, ...], groups: int) -> torch.Tensor:
    """d with its adapted slices put among `groups` blocks along dim (zeros where no slice is adapted)."""
    if len(slices) == groups:
        return d
    shape = list(d.shape)
    shape[dim] = groups
    index = torch.tensor(slices, device=d.device)
    return d.new_zeros(shape).index_copy(dim % d.dim(), index, d)


class LoRABank(nn.Module):
    """Frozen adapters for inference over a frozen linear layer of any kind (plain, packed, int8, int4).

    Adapter k's update is `(x A_k^T) B_k^T` with alpha / r folded into B_k, where A_k (R_k, in) stacks its
    slices' A and B_k (out, R_k) places their B in the output blocks they adapt. All adapters sit side by
    side along the rank (`A` (R, in), `Bt` = B^T (R, out), `owner` (R,): the adapter of each rank column),
    so one pair of matmuls updates a whole batch whose rows use different adapters: ROUTE gives each row's
    adapter, and the columns of the others are masked out. With no ROUTE the `always` adapters update
    every row (a model loaded with one adapter)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.out_features, self.in_features = base.out_features, base.in_features
        device = _device(base)
        self.register_buffer("A", torch.empty(0, self.in_features, device=device))
        self.register_buffer("Bt", torch.empty(0, self.out_features, device=device))
        self.register_buffer("owner", torch.empty(0, dtype=torch.long, device=device))
        self.always: tuple[int, ...] = ()
        self.always_cols: torch.Tensor | None = None  # the `always` adapters' columns (None: all of them)

    def add(self, index: int, A: torch.Tensor, B: torch.Tensor, always: bool, dtype: torch.dtype) -> None:
        """Adapter `index`: A (R_k, in), B (out, R_k) with its scaling folded in, held in `dtype`."""
        self.A = torch.cat([self.A.to(dtype), A.to(self.A.device, dtype)])
        self.Bt = torch.cat([self.Bt.to(dtype), B.t().to(self.Bt.device, dtype)])
        self.owner = torch.cat([self.owner, self.owner.new_full((A.size(0),), index)])
        self.always += (index,) if always else ()
        cols = torch.isin(self.owner, self.owner.new_tensor(self.always))
        self.always_cols = None if bool(cols.all()) else cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ids = None if torch.compiler.is_compiling() else ROUTE.get()  # compiled steps serve `always` only
        if ids is None:
            if not self.always:
                return y
            mask = self.always_cols  # None: every column is always on
        elif ids.dim() == 0:  # every row: one adapter
            mask = self.owner == ids
        else:  # ids (B,): each row's adapter (-1: none)
            mask = ids.view(-1, *[1] * (x.dim() - 1)) == self.owner  # (B, 1, .., R)
        h = F.linear(x.to(self.A.dtype), self.A)  # (..., R)
        if mask is not None:
            h = h * mask
        return y + (h @ self.Bt).to(y.dtype)

    def delta_weight(self, indices: tuple[int, ...]) -> torch.Tensor:
        """The summed update of adapters `indices` to the weight, (out, in) in fp32."""
        cols = torch.isin(self.owner, self.owner.new_tensor(indices))
        return self.Bt[cols].float().t() @ self.A[cols].float()

    def merged_weight(self) -> torch.Tensor:
        """The weight with the `always` adapters folded in, in the weight's dtype (a plain base only)."""
        w = self.base.weight
        return (w.float() + self.delta_weight(self.always)).to(w.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, adapters={sorted(set(self.owner.tolist()))}, "
                f"rank={self.A.size(0)}, always={self.always}")


# each row's adapter in the current forward: a LongTensor (B,) of adapter indices (-1: the base alone), or a
# 0-dim one for every row; None (the default): each LoRABank's `always` adapters. Set per forward by whoever
# knows the rows (generation/adapters.py, `routed`); a context variable, so per thread.
ROUTE: ContextVar[torch.Tensor | None] = ContextVar("kogpt_lora_route", default=None)


@contextmanager
def routed(ids: torch.Tensor | None) -> Iterator[None]:
    """Run the forwards inside with this ROUTE."""
    token = ROUTE.set(ids)
    try:
        yield
    finally:
        ROUTE.reset(token)


def _device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's trainable LoRA layers by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_banks(model: nn.Module) -> dict[str, LoRABank]:
    """The model's served adapter layers by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRABank)}
