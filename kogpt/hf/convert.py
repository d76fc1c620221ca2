"""The only module that knows Hugging Face names: config.json keys and parameter names, both ways.

GPT-2: `transformer.h.{i}.attn.c_attn` etc. are Conv1D layers storing (in, out) weights, which
become (out, in) nn.Linear weights here. GPT-J: separate `q_proj/k_proj/v_proj` are fused into
`attn.qkv`; `fc_in/fc_out` become `mlp.fc/mlp.proj`. Sequence classifiers (*ForSequenceClassification)
have no lm_head but `score.weight`, and id2label / problem_type in config.json. Conversion works
tensor by tensor from a getter, so a checkpoint is never materialized twice.

    for name, tensor in from_hf(get_tensor, hf_names, config): ...
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from ..core.config import GPTConfig
from ..core.dtypes import LONG, long_name, torch_dtype

_FAMILY_OF_MODEL_TYPE = {"gpt2": "gpt2", "gptj": "gptj"}
_ARCHITECTURE = {"gpt2": "GPT2LMHeadModel", "gptj": "GPTJForCausalLM"}
_CONFIG_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "rotary_dim",
                "layer_norm_epsilon", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


class ConversionError(ValueError):
    pass


# -- config.json ----------------------------------------------------------------------------------
def config_from_hf(d: dict) -> GPTConfig:
    """GPTConfig from the dict of an HF config.json (model_type gpt2 or gptj)."""
    model_type = d.get("model_type")
    if model_type not in _FAMILY_OF_MODEL_TYPE:
        raise ConversionError(f"model_type {model_type!r} is not supported (kogpt runs gpt2 and gptj)")
    act = d.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConversionError(f"activation_function {act!r} is not supported (gelu_new only)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if d.get(flag):
            raise ConversionError(f"{flag}=true is not supported")
    if d.get("scale_attn_weights") is False:
        raise ConversionError("scale_attn_weights=false is not supported")
    family = _FAMILY_OF_MODEL_TYPE[model_type]
    kw = {k: d[k] for k in _CONFIG_KEYS if k in d}
    kw.setdefault("tie_word_embeddings", family == "gpt2")
    if family == "gpt2":
        kw.pop("rotary_dim", None)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(kw.get(k), list):  # HF allows a list of eos ids; keep the first
            kw[k] = kw[k][0] if kw[k] else None
    known = set(_CONFIG_KEYS) | {"model_type"}
    extra = {k: v for k, v in d.items() if k not in known}
    return GPTConfig(family=family, extra=extra, **kw)


def config_to_hf(cfg: GPTConfig, dtype: torch.dtype | None = None) -> dict:
    """An HF config.json dict that transformers (and vLLM) load as GPT2LMHeadModel / GPTJForCausalLM."""
    d = {
        "architectures": [_ARCHITECTURE[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_positions,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.n_inner,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "use_cache": True,
    }
    if cfg.family == "gpt2":
        d["n_ctx"] = cfg.n_positions
    else:
        d["rotary_dim"] = cfg.rope_dim
    if dtype is not None:
        d["torch_dtype"] = d["dtype"] = long_name(dtype)
    return d


def dropout_from_hf(d: dict) -> float:
    """The dropout transformers finetunes this config with: resid_pdrop (kogpt uses one rate for the
    embeddings, attention and residuals), else the class default (GPT2Config 0.1, GPTJConfig 0.0)."""
    p = d.get("resid_pdrop", 0.1 if d.get("model_type") == "gpt2" else 0.0)
    return float(p) if isinstance(p, (int, float)) and 0 <= p < 1 else 0.0


def dtype_from_hf(d: dict) -> torch.dtype | None:
    """The dtype a config.json declares (`torch_dtype` or `dtype`), if any."""
    name = d.get("dtype") or d.get("torch_dtype")
    return torch_dtype(name) if name in LONG.values() else None


# -- parameters -----------------------------------------------------------------------------------
def _layer_map(cfg: GPTConfig, i: int) -> dict[str, tuple[list[str], bool]]:
    """kogpt name -> (HF names to concatenate, transpose?) for layer i."""
    h = f"transformer.h.{i}."
    if cfg.family == "gpt2":  # Conv1D weights are (in, out): transpose
        m = {
            "ln_1.weight": ([h + "ln_1.weight"], False), "ln_1.bias": ([h + "ln_1.bias"], False),
            "attn.qkv.weight": ([h + "attn.c_attn.weight"], True), "attn.qkv.bias": ([h + "attn.c_attn.bias"], False),
            "attn.proj.weight": ([h + "attn.c_proj.weight"], True), "attn.proj.bias": ([h + "attn.c_proj.bias"], False),
            "ln_2.weight": ([h + "ln_2.weight"], False), "ln_2.bias": ([h + "ln_2.bias"], False),
            "mlp.fc.weight": ([h + "mlp.c_fc.weight"], True), "mlp.fc.bias": ([h + "mlp.c_fc.bias"], False),
            "mlp.proj.weight": ([h + "mlp.c_proj.weight"], True), "mlp.proj.bias": ([h + "mlp.c_proj.bias"], False),
        }
    else:
        m = {
            "ln_1.weight": ([h + "ln_1.weight"], False), "ln_1.bias": ([h + "ln_1.bias"], False),
            "attn.qkv.weight": ([h + f"attn.{p}_proj.weight" for p in "qkv"], False),
            "attn.proj.weight": ([h + "attn.out_proj.weight"], False),
            "mlp.fc.weight": ([h + "mlp.fc_in.weight"], False), "mlp.fc.bias": ([h + "mlp.fc_in.bias"], False),
            "mlp.proj.weight": ([h + "mlp.fc_out.weight"], False), "mlp.proj.bias": ([h + "mlp.fc_out.bias"], False),
        }
    return {f"h.{i}.{k}": v for k, v in m.items()}


def name_map(cfg: GPTConfig) -> dict[str, tuple[list[str], bool]]:
    """Every kogpt parameter name -> (HF names, transpose?)."""
    m = {"wte.weight": (["transformer.wte.weight"], False),
         "ln_f.weight": (["transformer.ln_f.weight"], False), "ln_f.bias": (["transformer.ln_f.bias"], False)}
    if cfg.family == "gpt2":
        m["wpe.weight"] = (["transformer.wpe.weight"], False)
    for i in range(cfg.n_layer):
        m.update(_layer_map(cfg, i))
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = (["lm_head.weight"], False)
    if cfg.family == "gptj":
        m["lm_head.bias"] = (["lm_head.bias"], False)
    return m


def canonical_hf_names(names: Iterable[str]) -> dict[str, str]:
    """Map canonical HF names (`transformer.` prefix) to the names a file actually uses.

    Bare GPT2Model checkpoints (e.g. the original `gpt2`) store `h.0...` without the prefix.
    """
    out = {}
    for n in names:
        if n.startswith(("transformer.", "lm_head.", "score.")):
            out[n] = n
        else:
            out["transformer." + n] = n
    return out


def from_hf(get: Callable[[str], torch.Tensor], names: Iterable[str], cfg: GPTConfig,
            classifier: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(kogpt name, tensor) for every parameter of a GPT, or with classifier of a Classifier (`gpt.*` and
    `score.weight`), one tensor at a time: the HF tensors fetched with get(name), transposed and fused.
    Raises ConversionError naming the first missing tensor."""
    available = canonical_hf_names(names)
    for ours, (theirs, transpose) in _mapping(cfg, classifier).items():
        missing = next((t for t in theirs if t not in available), None)
        if missing is not None:
            raise ConversionError(f"tensor {missing!r} is missing from the checkpoint")
        parts = [_transposed(get(available[t])) if transpose else get(available[t]) for t in theirs]
        t = (torch.cat(parts, 0) if len(parts) > 1 else parts[0]).contiguous()
        del parts  # the file's (untransposed, unfused) tensors are freed here, not at the next step
        yield ours, t
        del t  # nor is this one kept while the next is read


def _transposed(x: torch.Tensor) -> torch.Tensor:
    """x.t().contiguous(), copied in blocks of 64 rows of x: 2-3× faster than one strided copy (GPT-2's
    Conv1D weights are a third of a KoGPT2 load's time in fp32)."""
    out = torch.empty(x.shape[::-1], dtype=x.dtype)  # (out, in)
    for i in range(0, x.size(0), 64):
        out[:, i:i + 64] = x[i:i + 64].t()
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: GPTConfig, classifier: bool = False) -> dict[str, torch.Tensor]:
    """HF state dict of a GPT's (tied head omitted as transformers saves it) or a Classifier's state dict."""
    out = {}
    for ours, (theirs, transpose) in _mapping(cfg, classifier).items():
        x = sd[ours]
        parts = x.chunk(len(theirs), 0) if len(theirs) > 1 else [x]
        for t, p in zip(theirs, parts):
            out[t] = (p.t() if transpose else p).contiguous()
    return out


# -- generation_config.json -------------------------------------------------------------------------
_GENERATION_KEYS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty",
                    "no_repeat_ngram_size", "bad_words_ids", "max_length", "max_new_tokens")
_DISABLED = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "repetition_penalty": 1.0,
             "no_repeat_ngram_size": 0, "bad_words_ids": (), "temperature": 1.0}


def generation_from_hf(d: dict) -> dict:
    """Decoding settings from an HF generation_config.json (kogpt SamplingConfig field names)."""
    out = {}
    for k in _GENERATION_KEYS:
        if k in d:
            out[k] = _DISABLED.get(k) if d[k] is None else d[k]
    return {k: v for k, v in out.items() if v is not None}


def generation_to_hf(sampling: dict, max_length: int | None, max_new_tokens: int | None,
                     bos_id: int | None, eos_id: int | None, pad_id: int | None) -> dict:
    """An HF generation_config.json dict that reproduces kogpt's defaults in transformers."""
    d = {k: sampling[k] for k in _GENERATION_KEYS if k in sampling}
    d["bad_words_ids"] = [list(w) for w in d.get("bad_words_ids", ())] or None
    d.update(max_length=max_length, max_new_tokens=max_new_tokens,
             bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    return {k: v for k, v in d.items() if v is not None}


# -- sequence classifiers: GPT2ForSequenceClassification / GPTJForSequenceClassification --------------
_CLASSIFIER_ARCHITECTURE = {"gpt2": "GPT2ForSequenceClassification", "gptj": "GPTJForSequenceClassification"}
_SCORE = "score.weight"  # Linear(n_embd, num_labels, bias=False) on the last non-pad token
PROBLEM_TYPES = ("single_label_classification", "regression")


def is_classifier_config(d: dict) -> bool:
    """Whether an HF config.json dict describes a GPT-2 / GPT-J sequence classifier."""
    return any(a in _CLASSIFIER_ARCHITECTURE.values() for a in d.get("architectures") or ())


def classifier_config_from_hf(d: dict) -> tuple[GPTConfig, list[str], str]:
    """(backbone GPTConfig, label names in id order, problem_type) of a classifier's config.json.

    Labels come from `id2label` (keys 0..n-1), else `num_labels` (LABEL_i), else transformers'
    default of 2; problem_type defaults as transformers infers it (1 label: regression).
    """
    cfg = config_from_hf(d)
    id2label = d.get("id2label")
    if id2label:
        if not isinstance(id2label, dict) or sorted(map(str, id2label)) != sorted(map(str, range(len(id2label)))):
            raise ConversionError(f"id2label must map 0..n-1 to names, got {id2label!r}")
        labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    else:
        labels = [f"LABEL_{i}" for i in range(int(d.get("num_labels") or 2))]
    problem_type = d.get("problem_type") or ("regression" if len(labels) == 1 else PROBLEM_TYPES[0])
    if problem_type not in PROBLEM_TYPES:
        raise ConversionError(f"problem_type {problem_type!r} is not supported ({' or '.join(PROBLEM_TYPES)})")
    if (problem_type == "regression") != (len(labels) == 1):
        raise ConversionError(f"problem_type {problem_type} with {len(labels)} labels is not supported")
    return cfg, labels, problem_type


def classifier_config_to_hf(cfg: GPTConfig, labels: list[str], problem_type: str,
                            dtype: torch.dtype | None = None) -> dict:
    """config.json of a classifier that transformers loads as GPT2/GPTJForSequenceClassification."""
    d = config_to_hf(cfg, dtype)
    d["architectures"] = [_CLASSIFIER_ARCHITECTURE[cfg.family]]
    d["id2label"] = {str(i): name for i, name in enumerate(labels)}
    d["label2id"] = {name: i for i, name in enumerate(labels)}
    d["problem_type"] = problem_type
    return d


def _mapping(cfg: GPTConfig, classifier: bool) -> dict[str, tuple[list[str], bool]]:
    if not classifier:
        return name_map(cfg)
    backbone = {f"gpt.{k}": v for k, v in name_map(cfg).items() if not k.startswith("lm_head.")}  # no LM head
    return {_SCORE: ([_SCORE], False), **backbone}
