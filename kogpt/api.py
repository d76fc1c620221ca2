"""KoGPT: a model, its tokenizer and its generation defaults — what a user imports.

Text in, text out, through the one decode loop (generation/engine.py): batched generation with stop strings,
streaming through StreamDecoder (Hangul never split), log-likelihood scoring, and saving in HF
format. Generation defaults come from the checkpoint's generation_config.json (transformers' semantics),
else the family's model-card recipe (KoGPT2: greedy, repetition_penalty 2.0, max_length 128; KoGPT: sampling,
temperature 0.8, max_length 128); every call can override them.

    gpt = KoGPT.from_pretrained("kogpt-mini"); print(gpt.generate("오늘 날씨가"))
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .core.layout import Layout
from .fileio import write_json
from .hf.folder import CheckpointError, read_json, require_language_model
from .hf.hub import resolve
from .core.lora import lora_banks
from .generation.adapters import AdapterRouter, UseAdapter
from .hf.load import adapter_dtype, load
from .hf.peft import adapter_base, attach_adapter, read_adapter
from .hf.save import save_model
from .hf.convert import generation_from_hf, generation_to_hf
from .errors import UserError
from .generation.compiled_step import CompiledStep
from .generation.engine import StepFn, decode_step, generate
from .core.model import GPT
from .generation.sampling import SamplingConfig
from .generation.steering import PPLMConfig, Steerer, make_bags
from .text.stream import StreamDecoder
from .text.tokenizer import Tokenizer

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingConfig)}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class GenerationDefaults:
    """A model's default decoding recipe; max_new_tokens wins over max_length (prompt included)."""

    sampling: SamplingConfig = SamplingConfig()
    max_length: int | None = 128
    max_new_tokens: int | None = None
    pplm: dict = dataclasses.field(default_factory=dict)  # PPLM knobs measured for this model (e.g. its stepsize)

    @classmethod
    def for_family(cls, family: str) -> "GenerationDefaults":
        if family == "gptj":  # KakaoBrain KoGPT card: sampling, temperature 0.8, max_length 128
            return cls(SamplingConfig(do_sample=True, temperature=0.8), max_length=128)
        # SKT KoGPT2 card: greedy, repetition_penalty 2.0, max_length 128
        return cls(SamplingConfig(do_sample=False, repetition_penalty=2.0), max_length=128)


@dataclass
class Completion:
    prompt: str
    text: str  # the continuation only (prompt + text is the whole text), stop string and EOS excluded
    token_ids: list[int]  # ids of the continuation (EOS excluded)
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class TextStream:
    """Detokenizes one row as it grows, finds stop strings and holds back text that may start one."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], prompt_ids: Sequence[int] = ()):
        self.decoder = StreamDecoder(tokenizer, context=prompt_ids)  # keeps the space after the prompt
        self.stops = [s for s in stops if s]
        self.text, self.ids, self.sent, self.stopped = "", [], 0, False

    def push(self, token: int) -> bool:
        """Add a (non-EOS) token; True when a stop string has appeared (the text is cut before it)."""
        self.ids.append(token)
        piece = self.decoder.push(token)
        if not piece:
            return False
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
        return self.stopped

    def finish(self) -> None:
        if not self.stopped:
            self.text += self.decoder.flush()

    def ready(self, done: bool) -> str:
        """Text not yet handed out that can no longer turn into a stop string."""
        hold = 0 if done else max((len(s) - 1 for s in self.stops), default=0)
        end = max(self.sent, len(self.text) - hold)
        piece, self.sent = self.text[self.sent:end], end
        return piece


class KoGPT:
    """A Korean GPT ready to use: `.model` (GPT), `.tokenizer` (Tokenizer), `.defaults`."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, defaults: GenerationDefaults | None = None,
                 name: str = "kogpt"):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.adapters: dict[str, Path] = {}  # adapters served beside the base (add_adapter), by name
        self.router: AdapterRouter | None = None  # which engine rows use which adapter (with add_adapter)
        self.step_fn: StepFn = decode_step  # the Engine's cached forward (CompiledStep with compile=True)
        self.speculate = 0  # default draft length of speculative decoding (generation/speculative.py); 0: off
        self.defaults = defaults or GenerationDefaults.for_family(model.config.family)
        if tokenizer.vocab_size > model.config.vocab_size:  # e.g. added tokens past a 50,000 vocab
            warnings.warn(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                          f"{model.config.vocab_size} embeddings; prompts using the extra tokens are refused",
                          stacklevel=2)

    # -- loading and saving --------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, revision: str | None = None,
                        device: str | None = None, dtype: str | torch.dtype | None = None,
                        compile: bool = False, adapter: str | os.PathLike | None = None) -> "KoGPT":
        """Load a model folder or hub id (optionally at a revision) with its tokenizer.

        adapter: a PEFT LoRA adapter folder (or bundled adapter, e.g. kogpt-mini-chat) applied without merging,
        in any dtype (int8 and int4 included). name_or_path may itself be an adapter folder: its
        adapter_config.json names the base. compile: decode with a torch.compile'd step (compiled_step.py; CUDA
        graphs on GPU). On CPU the eager step measured faster (docs/performance.md), so it is off by default.
        """
        folder = resolve(name_or_path, revision)
        base = adapter_base(folder)
        if base is not None:  # an adapter folder: load its base model with it
            if adapter is not None:
                raise UserError(f"{name_or_path} is an adapter itself; pass its base model with adapter=")
            folder, adapter = resolve(base), folder
        adapter = None if adapter is None else resolve(adapter)
        require_language_model(folder, str(name_or_path), "generate with (kogpt eval runs it)")
        device = device or default_device()
        layout = Layout.parse(dtype, plain=compile)  # compiled over plain nn.Linear (docs/performance.md)
        model = load(folder, layout, device, adapter=adapter)
        if not isinstance(model, GPT):
            raise UserError(f"{adapter} is a classifier adapter: it has no language-model head to generate with")
        tokenizer = Tokenizer.from_dir(folder)  # TokenizerError (a UserError) names the file
        _check_special_ids(model, tokenizer, folder)
        defaults = GenerationDefaults.for_family(model.config.family)
        config = next((f / "generation_config.json" for f in (adapter, folder)
                       if f is not None and (f / "generation_config.json").exists()), None)
        if config is not None:  # an adapter's own recipe (e.g. a chat tune's) wins over the base's
            defaults = _defaults_from(read_json(config))
        gpt = cls(model, tokenizer, defaults, name=str(name_or_path))
        if compile:
            gpt.step_fn = CompiledStep(mode="reduce-overhead" if torch.device(device).type == "cuda" else None)
        return gpt

    def add_adapter(self, name: str, adapter: str | os.PathLike) -> None:
        """Serve a PEFT LoRA adapter (folder, bundled or hub name) beside the base under `name`: generation
        with adapter=name (over HTTP: a request's model) uses it. Every adapter shares the one base forward
        of a batch and updates only the rows that asked for it (generation/adapters.py)."""
        if not isinstance(name, str) or not name.strip() or name == self.name or name in self.adapters:
            raise UserError(f"adapter name {name!r} is empty or already taken (the base is {self.name!r})")
        if isinstance(self.step_fn, CompiledStep):  # a compiled graph cannot see each forward's route
            raise UserError("adapters added by name need the eager decode step; load the model without compile")
        if any(bank.always for bank in lora_banks(self.model).values()):
            raise UserError("this model was loaded with an adapter applied to every request; load the plain base "
                            "and add each adapter by name")
        folder = resolve(adapter)
        found = read_adapter(folder, self.model.config)
        if found.classifier or found.replaced:
            raise UserError(f"{folder} is not a plain language-model adapter (it replaces "
                            f"{', '.join(sorted(found.replaced)) or 'the head'})")
        attach_adapter(self.model, found, len(self.adapters), always=False, dtype=adapter_dtype(self.model))
        self.router = self.router or AdapterRouter(self.model)
        self.adapters[name] = folder

    def adapter_index(self, adapter: str) -> int:
        """The index of an added adapter (core/lora.ROUTE's ids); UserError for an unknown name."""
        if adapter not in self.adapters:
            known = ", ".join([self.name, *self.adapters])
            raise UserError(f"unknown adapter {adapter!r}; this model serves {known}")
        return list(self.adapters).index(adapter)

    def adapter_hooks(self, adapter: str | None, steered: bool = False) -> list[UseAdapter]:
        """The hook that makes one request use adapter `adapter` ([] for the base); UserError for an unknown name,
        or for steering on an added adapter (PPLM's own forwards would run through the base)."""
        if adapter is None or adapter == self.name:
            return []
        index = self.adapter_index(adapter)
        if steered:
            raise UserError(f"steering (bow) runs on the base model {self.name!r}, not on adapter {adapter!r}; "
                            f"load the adapter with --adapter to steer it")
        return [UseAdapter(self.router, index)]

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write an HF-format folder (config, safetensors, tokenizer, generation config)."""
        folder = Path(folder)
        save_model(self.model, folder)
        self.tokenizer.save(folder)
        d = self.defaults
        config = generation_to_hf(dataclasses.asdict(d.sampling), d.max_length, d.max_new_tokens,
                                  self.tokenizer.bos_id, self.tokenizer.eos_id, self.tokenizer.pad_id)
        write_json(folder / "generation_config.json", config | ({"pplm": d.pplm} if d.pplm else {}))

    # -- generation ----------------------------------------------------------------------------
    def options(self, steering: bool = False, **overrides) -> tuple[SamplingConfig, int | None, int | None]:
        """Sampling config and length limits: the model's defaults with `overrides` applied.

        Keys: SamplingConfig fields, max_new_tokens, max_length, greedy (bool). Unknown keys
        are a UserError. steering: top_k defaults to 10 (upstream PPLM's) unless given.
        """
        if steering and overrides.get("top_k") is None:
            overrides["top_k"] = 10
        unknown = set(overrides) - _SAMPLING_FIELDS - {"max_new_tokens", "max_length", "greedy"}
        if unknown:
            raise UserError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        greedy = overrides.pop("greedy", None)
        max_new, max_len = overrides.pop("max_new_tokens", None), overrides.pop("max_length", None)
        changes = {k: v for k, v in overrides.items() if v is not None}
        if greedy:
            changes["do_sample"] = False
        elif "temperature" in changes and changes["temperature"] > 0 and "do_sample" not in changes:
            changes["do_sample"] = True  # asking for a temperature means sampling
        sampling = self.defaults.sampling.replace(**changes)
        if max_new is None and max_len is None:
            max_new, max_len = self.defaults.max_new_tokens, self.defaults.max_length
        for name, v in (("max_new_tokens", max_new), ("max_length", max_len)):
            if v is not None and v < 1:
                raise UserError(f"{name} must be >= 1, got {v}")
        return sampling, max_new, max_len

    def _budget(self, n_prompt: int, max_new: int | None, max_len: int | None) -> int:
        if max_new is not None:
            return max_new
        if max_len is not None:
            return max(0, max_len - n_prompt)
        return self.model.config.n_positions - n_prompt

    def encode_prompt(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise UserError(f"a prompt must be a string, got {type(prompt).__name__}")
        ids = self.tokenizer.encode(prompt)
        if ids and max(ids) >= self.model.config.vocab_size:
            raise UserError(f"the prompt holds token id {max(ids)}, past the model's vocabulary of "
                            f"{self.model.config.vocab_size}")
        if not ids:  # an empty prompt starts a new document
            ids = [self.tokenizer.start_id or 0]
        return ids

    def steerers(self, bow, pplm: PPLMConfig | dict | None, n: int) -> list[Steerer] | None:
        """n fresh PPLM Steerers for `bow` (a topic name or word-list file, a list of words, or a list of
        those), or None when bow is None or pplm turns steering off (stepsize 0). Knobs pplm leaves out take
        the model's own (its generation_config.json "pplm"), else upstream PPLM's."""
        config = pplm if isinstance(pplm, PPLMConfig) else PPLMConfig.from_dict({**self.defaults.pplm, **(pplm or {})})
        if bow is None or not config.active:
            return None
        bags = make_bags(bow, self.tokenizer)
        return [Steerer(bags, config) for _ in range(n)]

    def iter_completions(self, prompts: Sequence[str], *, stop: Sequence[str] = (), seed: int | None = None,
                         num_return_sequences: int = 1, bow=None, pplm: PPLMConfig | dict | None = None,
                         speculate: int | None = None, adapter: str | None = None,
                         **options) -> Iterator[tuple[int, str, Completion | None]]:
        """Yield (row, text piece, None) as text is produced, then (row, "", Completion) when a row ends.

        Rows are the prompts, each repeated num_return_sequences times, generated as one batch.
        bow steers toward a bag of words with PPLM (steering.py; knobs in pplm); top_k defaults to 10 then.
        speculate: draft up to this many tokens per step from the text so far and verify them in one forward
        (same tokens greedy, same distribution sampling; faster when the output repeats its input); default
        self.speculate; steered rows never speculate. adapter: the name of an adapter added with add_adapter
        (None: the base).
        """
        if num_return_sequences < 1:
            raise UserError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
        sampling, max_new, max_len = self.options(steering=bow is not None, **options)
        prompts = [p for p in prompts for _ in range(num_return_sequences)]
        encoded = [self.encode_prompt(p) for p in prompts]
        self.adapter_hooks(adapter, steered=bow is not None)  # an unknown name fails before any work
        steerers = self.steerers(bow, pplm, len(prompts)) or [None] * len(prompts)
        hooks = [[s for s in (steerer,) if s] + self.adapter_hooks(adapter) for steerer in steerers]
        rows = [TextStream(self.tokenizer, stop, e) for e in encoded]
        rng = None
        if seed is not None:
            rng = torch.Generator(self.model.wte.weight.device).manual_seed(seed)
        eos = [i for i in {self.tokenizer.eos_id} if i is not None]
        events = generate(self.model, encoded, max_new_tokens=[self._budget(len(e), max_new, max_len) for e in encoded],
                          sampling=sampling, eos_ids=eos, rng=rng, stop=lambda b, tok: rows[b].push(tok), hooks=hooks,
                          step_fn=self.step_fn, speculate=self.speculate if speculate is None else speculate)
        for ev in events:
            row = rows[ev.key]
            if ev.finish:
                row.finish()
            piece = row.ready(done=ev.finish is not None)
            if piece:
                yield ev.key, piece, None
            if ev.finish:
                yield ev.key, "", Completion(prompts[ev.key], row.text, row.ids, ev.finish)

    def complete(self, prompts: Sequence[str], *, batch_size: int = 8, **kw) -> list[Completion]:
        """Completions of every prompt (× num_return_sequences), in order, batch_size prompts at a time."""
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        out: list[Completion] = []
        for i in range(0, len(prompts), batch_size):
            done = {}
            for row, _, c in self.iter_completions(prompts[i:i + batch_size], **kw):
                if c is not None:
                    done[row] = c
            out.extend(done[r] for r in sorted(done))
        return out

    def generate(self, prompt: str | Sequence[str], **kw) -> str | list[str]:
        """Continuation text of a prompt (a str), or of each prompt of a list (× num_return_sequences)."""
        texts = [c.text for c in self.complete([prompt] if isinstance(prompt, str) else list(prompt), **kw)]
        return texts[0] if isinstance(prompt, str) and len(texts) == 1 else texts

    def stream(self, prompt: str, **kw) -> Iterator[str]:
        """Text pieces of one continuation as they are generated (never a split syllable)."""
        for _, piece, _ in self.iter_completions([prompt], **kw):
            if piece:
                yield piece

    @torch.inference_mode()
    def score(self, text: str) -> float:
        """Log-likelihood of `text` in nats, every token given the ones before and the start token
        (BOS, else EOS). Text longer than the context is refused: `kogpt eval --task perplexity`
        scores long documents with a sliding window."""
        start = [self.tokenizer.start_id] if self.tokenizer.start_id is not None else []
        ids = start + self.tokenizer.encode(text)
        if len(ids) < 2:
            raise UserError("score needs text of at least one token (two without a BOS/EOS token)")
        if len(ids) > self.model.config.n_positions:
            raise UserError(f"text of {len(ids)} tokens is longer than the model's context "
                            f"({self.model.config.n_positions}); use kogpt eval --task perplexity")
        x = torch.tensor([ids], device=self.model.wte.weight.device)
        logp = self.model(x[:, :-1]).float().log_softmax(-1)
        return logp[0].gather(-1, x[0, 1:, None]).sum().item()


def _defaults_from(hf: dict) -> GenerationDefaults:
    """Defaults from a generation_config.json: absent keys take transformers' defaults (greedy, no
    penalties, top_k 50), except max_length, which is 128 (the model cards') instead of 20. kogpt's own
    key "pplm" holds PPLM knobs measured for the model (transformers keeps unknown keys as they are)."""
    pplm, hf = hf.get("pplm") or {}, generation_from_hf(hf)
    try:
        sampling = SamplingConfig(do_sample=False).replace(**{k: v for k, v in hf.items() if k in _SAMPLING_FIELDS})
        PPLMConfig.from_dict(pplm)
    except (TypeError, AttributeError, UserError) as e:
        raise CheckpointError(f"generation_config.json: {e}") from None
    if "max_new_tokens" in hf or "max_length" in hf:
        return GenerationDefaults(sampling, hf.get("max_length"), hf.get("max_new_tokens"), pplm)
    return GenerationDefaults(sampling, pplm=pplm)


def _check_special_ids(model: GPT, tok: Tokenizer, folder: Path) -> None:
    """Warn once when config.json's special ids disagree with the tokenizer; the tokenizer wins."""
    cfg = model.config
    diffs = [f"{name}_token_id {ours} (tokenizer: {theirs})"
             for name, ours, theirs in (("bos", cfg.bos_token_id, tok.bos_id), ("eos", cfg.eos_token_id, tok.eos_id))
             if ours is not None and theirs is not None and ours != theirs]
    if diffs:
        warnings.warn(f"{folder / 'config.json'} names {', '.join(diffs)}; using the tokenizer's ids",
                      stacklevel=3)
