"""PPLM bag-of-words steering (Dathathri et al. 2020) for Korean words of several tokens.

At every step of a steered request, before the cached forward of the last token, the keys/values
of the whole past are nudged by `num_iterations` normalized gradient steps on

    loss = Σ_bags -log Σ_{t ∈ targets(bag, history)} p(t)  +  kl_scale · KL(p ‖ p_unsteered)

and stay nudged (as upstream, the perturbation accumulates in the cache). The next-token
distribution is the geometric mix p_steered^gm_scale · p_unsteered^(1 - gm_scale), which the normal
sampler then filters (top_k 10 by default, as upstream). The unsteered distribution comes from a
shadow cache of the same tokens that is never perturbed. Knobs and defaults are upstream's
(uber-research/PPLM run_pplm.py), with two deliberate differences: horizon_length is not offered
(only the discriminator loss uses it), and window_length N perturbs the N most recent positions
(upstream's mask perturbs the first N, reported upstream as a bug). The fused distribution is
computed on the logit scale, so temperature and repetition penalty act on it as on plain logits
(upstream divides only the steered logits by the temperature). With a 16-bit KV cache, the steered
row's past is kept in fp32 beside the cache, so small steps accumulate instead of rounding away.

Korean words are mostly several tokens ("축구를" → ▁축구 + 를; a rare word → ▁축 + 구). Upstream keeps
only single-token words, which drops most of a Korean list. Here every word contributes its token
sequences (at a word start, after a space, and inside a word) and a step's targets are
- the first token of every sequence (a topic word may start here), and
- the next token of every sequence whose proper prefix ends the text so far (a word in progress
  is pulled to completion).

    bags = [BagOfWords.load("sports", tokenizer)]
    steer = Steerer(bags, PPLMConfig())   # a RequestHook, one per request: Request(..., hooks=[steer])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Sequence

import torch

from ..errors import UserError
from ..core.kv_cache import KVCache
from ..core.model import GPT
from ..text.tokenizer import Tokenizer
from .hooks import RequestHook

SMALL = 1e-15  # upstream's SMALL_CONST
TOPICS = {"sports": "스포츠", "economy": "경제", "politics": "정치", "science": "과학", "fantasy": "판타지",
          "horror": "공포", "mystery": "추리", "space": "우주"}  # bundled word lists: kogpt/bow/<name>.txt


class SteeringError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class PPLMConfig:
    """Upstream's knobs and defaults. stepsize 0 (or num_iterations 0) turns steering off."""

    stepsize: float = 0.02  # size of each normalized gradient step on the past keys/values
    num_iterations: int = 3  # gradient steps per generated token
    kl_scale: float = 0.01  # weight of KL(steered ‖ unsteered) in the loss
    gm_scale: float = 0.9  # p = p_steered^gm · p_unsteered^(1-gm)
    gamma: float = 1.5  # gradients are divided by their (running max) norm ** gamma
    window_length: int = 0  # perturb only the N most recent past positions; 0 = all (see the module doc)
    grad_length: int = 10000  # steer the first N generated tokens only

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kind = (int,) if f.type == "int" else (int, float)
            if isinstance(v, bool) or not isinstance(v, kind):
                raise SteeringError(f"pplm {f.name} must be {'an integer' if f.type == 'int' else 'a number'}, got {v!r}")
        for name, ok in (("stepsize", self.stepsize >= 0), ("num_iterations", self.num_iterations >= 0),
                         ("kl_scale", self.kl_scale >= 0), ("gm_scale", 0 <= self.gm_scale <= 1),
                         ("gamma", self.gamma >= 0), ("window_length", self.window_length >= 0),
                         ("grad_length", self.grad_length >= 0)):
            if not ok:
                bound = "in [0, 1]" if name == "gm_scale" else ">= 0"
                raise SteeringError(f"pplm {name} must be {bound}, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "PPLMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d or {}) - known
        if unknown:
            raise SteeringError(f"unknown pplm option(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return cls(**(d or {}))

    @property
    def active(self) -> bool:
        return self.stepsize > 0 and self.num_iterations > 0


def topics() -> list[str]:
    """Names of the bundled word lists (each also answers to its Korean name, e.g. 스포츠)."""
    return list(TOPICS)


def read_words(spec: str) -> tuple[str, list[str]]:
    """(name, words) of a bundled topic (English or Korean name) or a word-list file: one word or
    phrase per line (commas also separate), `#` starts a comment."""
    korean = {v: k for k, v in TOPICS.items()}
    name = korean.get(spec, spec)
    if name in TOPICS:
        text = files("kogpt").joinpath(f"bow/{name}.txt").read_text(encoding="utf-8")
    else:
        path = Path(spec)
        if not path.is_file():
            raise SteeringError(f"bag of words {spec!r} is neither a bundled topic ({', '.join(TOPICS)}) nor a file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SteeringError(f"{path} is not UTF-8 text") from None
    words = [w.strip() for line in text.splitlines() if not line.lstrip().startswith("#") for w in line.split(",")]
    words = [w for w in words if w]
    if not words:
        raise SteeringError(f"bag of words {spec!r} has no words")
    return name, words


class BagOfWords:
    """The token sequences of a list of words and the targets they give at each step."""

    def __init__(self, name: str, words: Sequence[str], sequences: Sequence[Sequence[int]]):
        self.name, self.words = name, list(words)
        self.sequences = sorted({tuple(s) for s in sequences if s})
        if not self.sequences:
            raise SteeringError(f"bag of words {name!r} has no words")
        self.first = sorted({s[0] for s in self.sequences})
        self.next: dict[tuple[int, ...], set[int]] = {}  # proper prefix -> the tokens that continue it
        for s in self.sequences:
            for j in range(1, len(s)):
                self.next.setdefault(s[:j], set()).add(s[j])
        self.longest = max(len(s) for s in self.sequences) - 1

    @classmethod
    def from_words(cls, words: Sequence[str], tokenizer: Tokenizer, name: str = "words") -> "BagOfWords":
        return cls(name, words, [s for w in words for s in word_sequences(w, tokenizer)])

    @classmethod
    def load(cls, spec: str, tokenizer: Tokenizer) -> "BagOfWords":
        """A bundled topic or a word-list file (see read_words)."""
        name, words = read_words(spec)
        return cls.from_words(words, tokenizer, name)

    def targets(self, history: Sequence[int]) -> set[int]:
        """Token ids that start a word or continue a word in progress at the end of `history`."""
        out = set(self.first)
        for j in range(1, min(self.longest, len(history)) + 1):
            out |= self.next.get(tuple(history[-j:]), set())
        return out

    def __repr__(self) -> str:
        return f"BagOfWords({self.name!r}, {len(self.words)} words, {len(self.sequences)} token sequences)"


def word_sequences(word: str, tokenizer: Tokenizer) -> set[tuple[int, ...]]:
    """The token sequences a word takes: alone, after a space and glued to a preceding syllable.

    Each in-context form is the tokens of context + word after the context's own tokens; contexts
    whose tokens merge with the word are skipped.
    """
    out = {tuple(tokenizer.encode(word))}
    for ctx in ("가 ", "가", "."):
        pre, full = tokenizer.encode(ctx.strip()), tokenizer.encode(ctx + word)
        if full[:len(pre)] == pre and len(full) > len(pre):
            out.add(tuple(full[len(pre):]))
    return {s for s in out if s}


def make_bags(bow, tokenizer: Tokenizer) -> list[BagOfWords]:
    """Bags from `bow`: a topic name or file (str), a list of words, or a list of those (several bags)."""
    if isinstance(bow, BagOfWords):
        return [bow]
    if isinstance(bow, str):
        return [BagOfWords.load(bow, tokenizer)]
    items = list(bow)
    if not items:
        raise SteeringError("bow is empty: give a topic name, a word-list file or a list of words")
    if all(isinstance(w, str) for w in items):
        return [BagOfWords.from_words(items, tokenizer)]
    bags: list[BagOfWords] = []
    for item in items:
        bags += make_bags(item, tokenizer)
    return bags


class _PerturbedPast:
    """A one-row Cache (core/kv_cache.py) whose past keys/values are tensors that carry gradients
    (KVCache writes in place, which autograd cannot see through)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v  # (n_layer, 1, nh, L, hs)
        self.length = k.size(3)

    def prepare(self, rows, T: int):
        pos = torch.arange(self.length, self.length + T, device=self.k.device)[None]  # (1, T)
        return pos, None, False  # one new token sees the whole past: no mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return torch.cat((self.k[layer], k), 2), torch.cat((self.v[layer], v), 2)  # (1, nh, L + T, hs)

    def advance(self) -> None:
        pass


class Steerer(RequestHook):
    """The steering state of one request: its bags, knobs, shadow cache and running gradient norms.

    It is the request's RequestHook: the decode loop calls start() once the prompt (all but its last
    token) is in the cache row, perturb() (as before_step) before each cached forward of the row's
    last token, and fuse() (as map_logits) on the logits it gives.
    """

    steps_last_prompt_token = True  # the first new token is steered too

    def __init__(self, bags: Sequence[BagOfWords], config: PPLMConfig = PPLMConfig()):
        if not bags:
            raise SteeringError("steering needs at least one bag of words")
        self.bags, self.config = list(bags), config
        self.shadow: KVCache | None = None  # the same tokens, never perturbed
        self.master: tuple[torch.Tensor, torch.Tensor] | None = None  # fp32 past of a 16-bit cache row
        self.filled = 0  # positions of the row copied into master
        self.grad_norms: torch.Tensor | None = None  # (n_layer,) running max, as upstream for BoW
        self.steps = 0
        self.unsteered: torch.Tensor | None = None  # (V,) fp32 next-token logits without steering

    def start(self, cache: KVCache, row: int, max_len: int) -> None:
        """Begin a request in cache row `row` that will hold at most max_len positions."""
        if self.shadow is not None:
            raise SteeringError("a Steerer serves one request; make one per prompt")
        c, n = cache, int(cache.lengths[row])
        shape = (c.k.size(0), 1, c.k.size(2), max_len, c.k.size(4))
        self.shadow = KVCache(shape[0], 1, shape[2], max_len, shape[4], c.k.dtype, c.k.device)
        self.shadow.k[:, :, :, :n] = c.k[:, row:row + 1, :, :n]
        self.shadow.v[:, :, :, :n] = c.v[:, row:row + 1, :, :n]
        self.shadow.lengths[0] = n
        if c.k.dtype != torch.float32:
            self.master = (torch.zeros(shape, device=c.k.device), torch.zeros(shape, device=c.k.device))

    def finish(self) -> None:
        """Free the request's caches (the decode loop calls it when the request ends)."""
        self.shadow = self.master = None

    def before_step(self, model: GPT, cache: KVCache, row: int, history: Sequence[int]) -> None:
        self.perturb(model, cache, row, history)

    def map_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self.fuse(logits)

    def targets(self, history: Sequence[int]) -> list[list[int]]:
        return [sorted(b.targets(history)) for b in self.bags]

    def perturb(self, model: GPT, cache: KVCache, row: int, history: Sequence[int]) -> None:
        """Steer cache row `row`, whose next input is history[-1], by gradient steps on its past."""
        if self.shadow is None:
            raise RuntimeError("Steerer.start() was not called")
        tok = torch.tensor([[history[-1]]], device=cache.k.device)
        self.unsteered = model(tok, self.shadow, slice(0, 1))[0, -1].float()  # (V,)
        cfg, L = self.config, int(cache.lengths[row])
        self.steps += 1
        if L == 0 or self.steps > cfg.grad_length:
            return
        targets = self.targets(history)
        if self.master is not None:  # positions written since the last step join the fp32 copy
            for m, c in zip(self.master, (cache.k, cache.v)):
                m[:, :, :, self.filled:L] = c[:, row:row + 1, :, self.filled:L]
            self.filled = L
        with torch.inference_mode(False), torch.enable_grad():
            src = self.master or (cache.k[:, row:row + 1], cache.v[:, row:row + 1])
            past_k = src[0][:, :, :, :L].clone()  # (n_layer, 1, nh, L, hs)
            past_v = src[1][:, :, :, :L].clone()
            dtype = cache.k.dtype
            unsteered, tok = self.unsteered.clone(), tok.clone()  # normal tensors: autograd may save them
            window = torch.ones(L, device=past_k.device)
            if 0 < cfg.window_length < L:
                window[:L - cfg.window_length] = 0
            window = window[:, None]  # (L, 1), broadcast over (…, L, hs)
            dk, dv = torch.zeros_like(past_k, dtype=torch.float32), torch.zeros_like(past_v, dtype=torch.float32)
            for _ in range(cfg.num_iterations):
                dk_, dv_ = dk.clone().requires_grad_(), dv.clone().requires_grad_()
                past = _PerturbedPast((past_k.float() + dk_).to(dtype), (past_v.float() + dv_).to(dtype))
                loss = self.loss(model(tok, past)[0, -1].float(), unsteered, targets)
                gk, gv = torch.autograd.grad(loss, (dk_, dv_))
                gk, gv = gk * window, gv * window
                norms = (gk.pow(2).sum((1, 2, 3, 4)) + gv.pow(2).sum((1, 2, 3, 4))).sqrt()  # (n_layer,)
                self.grad_norms = norms + SMALL if self.grad_norms is None else torch.maximum(self.grad_norms, norms)
                scale = (cfg.stepsize / self.grad_norms ** cfg.gamma).view(-1, 1, 1, 1, 1)
                dk, dv = dk - scale * gk, dv - scale * gv
            new_k, new_v = past_k.float() + dk, past_v.float() + dv
        if self.master is not None:
            self.master[0][:, :, :, :L], self.master[1][:, :, :, :L] = new_k, new_v
        cache.k[:, row:row + 1, :, :L] = new_k.to(dtype)
        cache.v[:, row:row + 1, :, :L] = new_v.to(dtype)

    def loss(self, logits: torch.Tensor, unsteered: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
        """Bag-of-words loss plus the KL term for next-token logits (V,)."""
        logp = logits.log_softmax(-1)
        bow = sum(-logp[torch.tensor(t, device=logp.device)].logsumexp(0) for t in targets)
        loss = bow
        if self.config.kl_scale > 0:  # upstream's KL with its small-probability corrections
            q = unsteered.softmax(-1)
            q = q + SMALL * (q <= SMALL).float()
            p = logp.exp()
            p = p + SMALL * (p <= SMALL).float().detach()
            loss = loss + self.config.kl_scale * (p * (p / q).log()).sum()
        return loss

    def fuse(self, logits: torch.Tensor) -> torch.Tensor:
        """Next-token logits (V,) whose softmax is p_steered^gm · p_unsteered^(1-gm), renormalized."""
        gm = self.config.gm_scale
        return gm * logits.float() + (1 - gm) * self.unsteered
