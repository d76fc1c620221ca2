"""Write a GPT-2-family kogpt model as a GGUF file that llama.cpp loads (architecture "gpt2").

Tensor names, metadata keys and which tensors stay F32 follow llama.cpp's own converter
(convert_hf_to_gguf.py GPT2Model, gguf-py constants.py / tensor_mapping.py). GGUF keeps PyTorch's
(out, in) layout, so kogpt's nn.Linear weights go in as they are (HF's Conv1D ones are transposed).
The tokenizer is llama.cpp's "gpt2" model (byte-level BPE); a folder without one gets a placeholder
vocabulary of the model's vocab_size, enough for llama-bench (it feeds random ids). Needs `gguf`.

    write_gguf("runs/kogpt2", "kogpt2-q8_0.gguf", "q8_0")

Q4_0 is llama.cpp's own 4-bit layout (blocks of 32 weights: an fp16 scale d and 16 bytes of nibbles,
w ≈ (q - 8) · d, symmetric), made by gguf-py's port of llama.cpp's reference quantizer from the float
weights of the folder, not from kogpt's int4 (asymmetric, bf16 scale and zero) weights: each engine rounds
the same float weights its own way. Every 2-D weight is Q4_0, token_embd included (llama-quantize --pure).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError

DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# kogpt module name -> llama.cpp GPT-2 tensor name (gguf MODEL_TENSOR names for MODEL_ARCH.GPT2)
_BLOCK = {"ln_1": "attn_norm", "attn.qkv": "attn_qkv", "attn.proj": "attn_output", "ln_2": "ffn_norm",
          "mlp.fc": "ffn_up", "mlp.proj": "ffn_down"}
_TOP = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm", "lm_head": "output"}
_PLACEHOLDER_MERGE = ("\u0120", "\u0120")  # "Ġ Ġ": llama.cpp needs >= 1 merge; gguf-py writes no empty array


def gguf_name(name: str) -> str:
    """llama.cpp's name for a kogpt parameter: 'h.3.attn.qkv.weight' -> 'blk.3.attn_qkv.weight'."""
    module, _, suffix = name.rpartition(".")
    if module.startswith("h."):
        _, layer, rest = module.split(".", 2)
        return f"blk.{layer}.{_BLOCK[rest]}.{suffix}"
    return f"{_TOP[module]}.{suffix}"


def _qtype(gguf, new_name: str, n_dims: int, dtype: str):
    # as convert_hf_to_gguf prepare_tensors: 1-D tensors, norms, biases and position_embd stay F32
    T = gguf.GGMLQuantizationType
    if n_dims <= 1 or new_name.endswith("_norm.weight") or not new_name.endswith(".weight") \
            or new_name.startswith("position_embd."):
        return T.F32
    return {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[dtype]


def _byte_symbols() -> list[str]:
    """GPT-2's bytes_to_unicode, in byte order: printable bytes map to themselves, the rest to 256+n."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    out, n = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + n))
            n += 1
    return out


def placeholder_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """A valid byte-level BPE of exactly vocab_size tokens: the 256 byte symbols, the one merged pair
    'ĠĠ' (two spaces) and <unused{i}> control tokens. Returns (tokens, token types, merges)."""
    import gguf

    first = [*_byte_symbols(), "".join(_PLACEHOLDER_MERGE)][:vocab_size]
    tokens = first + [f"<unused{i}>" for i in range(vocab_size - len(first))]
    types = [int(gguf.TokenType.NORMAL)] * len(first) + [int(gguf.TokenType.CONTROL)] * (vocab_size - len(first))
    return tokens, types, [" ".join(_PLACEHOLDER_MERGE)]


def _is_byte_level(spec: dict) -> bool:
    def has_byte_level(p) -> bool:
        if not isinstance(p, dict):
            return False
        return p.get("type") == "ByteLevel" or any(has_byte_level(q) for q in p.get("pretokenizers") or [])

    model = spec.get("model") or {}
    return model.get("type") == "BPE" and not model.get("byte_fallback") and has_byte_level(spec.get("pre_tokenizer"))


def tokenizer_vocab(folder: Path, vocab_size: int) -> tuple[list[str], list[int], list[str], dict[str, int]]:
    """(tokens by id, token types, merges, special ids) of the folder's byte-level BPE tokenizer,
    padded with [PAD{i}] (UNUSED) to vocab_size as llama.cpp's converter does."""
    import gguf

    from ..text.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(folder)
    spec = json.loads(tok.tokenizer.to_str())
    if not _is_byte_level(spec):
        raise UserError(f"{folder}: llama.cpp's gpt2 tokenizer is byte-level BPE and this tokenizer is not "
                        "(e.g. SentencePiece-style with byte fallback); export with tokenizer=False for a "
                        "placeholder vocabulary (enough for llama-bench)")
    vocab = tok.tokenizer.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"{folder}: tokenizer has id {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    added = tok.tokenizer.get_added_tokens_decoder()
    by_id = {i: t for t, i in vocab.items()}
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(T.UNUSED))
        else:
            tokens.append(by_id[i])
            types.append(int(T.NORMAL if i not in added else T.CONTROL if added[i].special else T.USER_DEFINED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges") or []]
    if not merges:
        raise UserError(f"{folder}: the tokenizer has no BPE merges; llama.cpp's gpt2 tokenizer needs at least one")
    special = {k: getattr(tok, f"{k}_id") for k in ("bos", "eos", "unk", "pad")}
    return tokens, types, merges, {k: v for k, v in special.items() if v is not None}


def write_gguf(folder: str | os.PathLike, path: str | os.PathLike, dtype: str = "f32", tokenizer: bool = True) -> Path:
    """Write the GPT-2-family model in `folder` as a GGUF file at `path`.

    dtype: "f32", "f16", "bf16", "q8_0" or "q4_0" for the 2-D weights (token_embd included, as llama.cpp's
    converter does; norms, biases and position_embd stay F32). The head is tied to token_embd, so no
    output tensor is written unless the model's head is untied. tokenizer: export the folder's
    byte-level BPE tokenizer if it has one (False, or no tokenizer files: a placeholder vocabulary).
    """
    import gguf
    import torch

    from ..core.layout import Layout
    from .folder import load_config, require_language_model
    from .load import load

    folder, path = Path(folder), Path(path)
    if dtype not in DTYPES:
        raise UserError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    require_language_model(folder, str(folder), "export to GGUF")
    cfg = load_config(folder)
    if cfg.family != "gpt2":
        raise UserError(f"GGUF export supports the GPT-2 family; {folder} is {cfg.family}")
    has_tokenizer = (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
    if tokenizer and has_tokenizer:
        tokens, types, merges, special = tokenizer_vocab(folder, cfg.vocab_size)
    else:
        tokens, types, merges = placeholder_vocab(cfg.vocab_size)
        special = {k: v for k, v in (("bos", cfg.bos_token_id), ("eos", cfg.eos_token_id), ("pad", cfg.pad_token_id))
                   if v is not None and 0 <= v < cfg.vocab_size}
    model = load(folder, Layout(torch.float32))

    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(folder.name)
    # GPT2Model.set_gguf_parameters (feed_forward_length: the real MLP width, which is 4 * n_embd there)
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.mlp_dim)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
                 "q4_0": "MOSTLY_Q4_0"}[dtype]
    w.add_file_type(gguf.LlamaFileType[file_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizer regex (ByteLevel use_regex)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, token_id in special.items():
        getattr(w, f"add_{key}_token_id")(token_id)
    w.add_add_bos_token(False)  # kogpt's encode() adds no BOS by default

    tied = cfg.tie_word_embeddings
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        new_name = gguf_name(name)
        data = t.detach().contiguous().numpy()
        qtype = _qtype(gguf, new_name, data.ndim, dtype)
        try:
            packed = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # a row length Q8_0 / Q4_0 cannot block (not a multiple of 32): F16, as the converter
            qtype = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(data, qtype)
        w.add_tensor(new_name, packed, raw_dtype=qtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
