"""GPTConfig: the shape of one model of either Korean GPT family, and the named presets.

`family` is the one architecture switch: "gpt2" (learned positions, sequential residual, biased
attention, tied head; SKT KoGPT2, ksjae KoGPT2/3) or "gptj" (interleaved rotary on the first
`rotary_dim` dims of each head, parallel residual with one LayerNorm, bias-free attention, untied
lm_head with bias; KakaoBrain KoGPT). Field names follow GPT-2/GPT-J. No torch import here.

    cfg = GPTConfig.preset("kogpt2-base-v2")
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

FAMILIES = ("gpt2", "gptj")


@dataclass(frozen=True)
class GPTConfig:
    family: str = "gpt2"
    vocab_size: int = 51200
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    rotary_dim: int | None = None  # gptj only; None means the whole head
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # unknown keys, kept

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.family == "gptj":
            if self.rotary_dim is not None and not (
                0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0
            ):
                raise ValueError(f"rotary_dim must be even and in (0, {self.head_dim}], got {self.rotary_dim}")
        elif self.rotary_dim is not None:
            raise ValueError("rotary_dim is a gptj setting; gpt2 uses learned positions")

    # -- derived ------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def rope_dim(self) -> int:
        """Dims of each head that rotate (0 for gpt2)."""
        if self.family != "gptj":
            return 0
        return self.rotary_dim or self.head_dim

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        C, V, L, M = self.n_embd, self.vocab_size, self.n_layer, self.mlp_dim
        gpt2 = self.family == "gpt2"
        attn = 4 * C * C + (4 * C if gpt2 else 0)
        mlp = 2 * C * M + M + C
        norms = (2 if gpt2 else 1) * 2 * C
        head = 0 if self.tie_word_embeddings else V * C + (V if not gpt2 else 0)
        pos = self.n_positions * C if gpt2 else 0
        return V * C + pos + L * (attn + mlp + norms) + 2 * C + head

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    # -- named presets ------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "GPTConfig":
        """A named preset; raises KeyError listing the known names."""
        try:
            return cls(**PRESETS[name])
        except KeyError:
            raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def _gpt2(n_layer, n_embd, n_head, vocab_size, **kw):
    return dict(family="gpt2", n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size, **kw)


PRESETS: dict[str, dict] = {
    # SKT KoGPT2 v2 (skt/kogpt2-base-v2): bos 0, eos 1, pad 3.
    "kogpt2-base-v2": _gpt2(12, 768, 12, 51200, bos_token_id=0, eos_token_id=1, pad_token_id=3),
    # ksjae KoGPT2/KoGPT3: the GPT-2 shapes. Their published configs name id 32766 as bos/eos,
    # so the vocabulary is taken as 32,768; loading a real checkpoint reads its own config.json.
    "kogpt2-117m": _gpt2(12, 768, 12, 32768),
    "kogpt2-345m": _gpt2(24, 1024, 16, 32768),
    "kogpt2-774m": _gpt2(36, 1280, 20, 32768),
    "kogpt2-1.5b": _gpt2(48, 1600, 25, 32768),
    # KakaoBrain KoGPT6B-ryan1.5b: GPT-J, head dim 256, rotary on the first 64 dims.
    "kogpt-6b": dict(
        family="gptj", n_layer=28, n_embd=4096, n_head=16, n_inner=16384, rotary_dim=64,
        n_positions=2048, vocab_size=64512, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ),
    # kogpt-mini, the bundled model (kogpt/models/kogpt-mini): 18.7M parameters, 24k kogpt BPE
    # (documents start and end with </s> = 1, as GPT-2's <|endoftext|>; pad 3), trained by kogpt.
    "kogpt-mini": _gpt2(5, 384, 6, 24576, bos_token_id=1, eos_token_id=1, pad_token_id=3),
    # Tiny shapes for tests and smoke runs.
    "tiny-gpt2": _gpt2(2, 32, 4, 1024, n_positions=128),
    "tiny-gptj": dict(
        family="gptj", n_layer=2, n_embd=32, n_head=4, rotary_dim=4, n_positions=128,
        vocab_size=1024, tie_word_embeddings=False,
    ),
    # About a million parameters with an 8k vocabulary: smoke-test pretraining.
    "tiny": _gpt2(4, 64, 4, 8192, n_positions=256),
}
