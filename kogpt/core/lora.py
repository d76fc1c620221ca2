"""LoRA: a frozen linear layer plus a low-rank update, `y = base(x) + B(A(dropout(x))) * alpha / r`.

The math and the init are PEFT's (A kaiming-uniform, B zeros, so a new adapter changes nothing). The base
stays in the loaded layout (bf16, int8, int4, ...) and never trains; trained A and B are fp32. GPT-J's
`attn.qkv` is HF's q_proj, k_proj and v_proj fused, so there it holds one A/B pair per adapted slice
(`groups`=3): the same parameters, and the same logits, as PEFT's three adapters. core/layout.py builds
fresh ones while the model loads, kogpt.hf.peft reads and writes them as PEFT adapter folders. Several
named adapters can sit on one base; ROUTE says which rows of a batch each one updates (multi-LoRA serving).

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
    """A frozen linear layer of any kind (`base`: nn.Linear, packed, int8, int4, or another LoRALinear) plus
    one adapter: lora_A (n·r, in) and lora_B (n, out/groups, r), n the number of adapted slices among
    `groups` equal row blocks of the output. Trained adapters are fp32; served ones may be 16-bit.

    Which rows of a batch get the update: all of them when no route is set (ROUTE, `routed`) and the
    adapter is `active`; with a route, the rows it lists under this adapter's `name`. Several adapters on
    one layer nest (each one's base is the previous), so the base forward runs once for every row."""

    def __init__(self, base: nn.Module, cfg: LoRAConfig, groups: int = 1, slices: tuple[int, ...] = (0,),
                 name: str = "default", active: bool = True):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.out_features, self.in_features = base.out_features, base.in_features
        self.r, self.alpha, self.scaling, self.dropout = cfg.r, cfg.alpha, cfg.alpha / cfg.r, cfg.dropout
        self.groups, self.slices, self.name, self.active = groups, tuple(slices), name, active
        n, device = len(self.slices), _device(base)
        self.lora_A = nn.Parameter(torch.empty(n * cfg.r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(n, self.out_features // groups, cfg.r, device=device))
        with torch.no_grad():
            for a in self.lora_A.view(n, cfg.r, self.in_features):
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default init of each A

    @property
    def weight(self) -> torch.Tensor:
        """The frozen float weight under the adapters (a plain base only)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def pair(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the k-th adapted slice's A (r, in) and B (out/groups, r): PEFT's lora_A and lora_B."""
        return self.lora_A.view(len(self.slices), self.r, self.in_features)[k], self.lora_B[k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        route = None if torch.compiler.is_compiling() else ROUTE.get()  # compiled steps: no routing (no --lora)
        if route is None:
            return y + self.delta(x).to(y.dtype) if self.active else y
        rows = route.get(self.name)
        if rows is None:
            return y
        if isinstance(rows, slice):  # every row of the batch
            return y + self.delta(x).to(y.dtype)
        return y.index_add(0, rows, self.delta(x.index_select(0, rows)).to(y.dtype))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """B(A(dropout(x))) * alpha / r, (..., out) in the adapter's dtype."""
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
        n = len(self.slices)
        a = F.linear(x.to(self.lora_A.dtype), self.lora_A).unflatten(-1, (n, self.r))  # (..., n, r)
        d = torch.einsum("...nr,nor->...no", a, self.lora_B) * self.scaling  # (..., n, out/groups)
        return self._place(d, -2).flatten(-2)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """The update the adapter adds to the weight, (out, in) in fp32: what merging adds."""
        A = self.lora_A.float().view(len(self.slices), self.r, self.in_features)  # (n, r, in)
        d = torch.einsum("nor,nri->noi", self.lora_B.float(), A) * self.scaling  # (n, out/groups, in)
        return self._place(d, 0).flatten(0, 1)  # (out, in)

    def merged_weight(self) -> torch.Tensor:
        """The weight with the update (and those of adapters nested below) folded in, in the weight's dtype."""
        below = self.base.merged_weight() if isinstance(self.base, LoRALinear) else self.base.weight
        return (below.float() + self.delta_weight()).to(below.dtype)

    def _place(self, d: torch.Tensor, dim: int) -> torch.Tensor:
        """d with its adapted slices put among `groups` blocks along dim (zeros where no slice is adapted)."""
        if len(self.slices) == self.groups:
            return d
        shape = list(d.shape)
        shape[dim] = self.groups
        index = torch.tensor(self.slices, device=d.device)
        return d.new_zeros(shape).index_copy(dim % d.dim(), index, d)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"slices={self.slices}/{self.groups}")


# which rows of the current forward each adapter updates: adapter name -> row indices (a LongTensor) or
# slice(None) for all rows; rows under no name get the base alone. None (the default): every active adapter
# updates every row. Set per forward by whoever knows the rows (generation/adapters.py); thread-local.
ROUTE: ContextVar[dict[str, torch.Tensor | slice] | None] = ContextVar("kogpt_lora_route", default=None)


@contextmanager
def routed(route: dict[str, torch.Tensor | slice] | None) -> Iterator[None]:
    """Run the forwards inside with this ROUTE."""
    token = ROUTE.set(route)
    try:
        yield
    finally:
        ROUTE.reset(token)


def _device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def lora_layers(model: nn.Module, name: str | None = None) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module name (nested adapters' names end in `.base`), all or adapter `name`'s."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, LoRALinear) and (name is None or m.name == name)}
