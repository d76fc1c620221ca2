"""The Tokenizer: a Rust `tokenizers.Tokenizer` plus its family's special tokens, loaded and saved.

Reads tokenizer.json (any pipeline: SKT KoGPT2, KakaoBrain KoGPT, kogpt's own from text/bpe.py) or
GPT-2 byte-level vocab.json + merges.txt, takes special tokens from the family convention and the HF
config files, and saves what transformers' `AutoTokenizer` loads with the same ids. Training lives in
text/bpe.py, streaming detokenization in text/stream.py.

    tok = Tokenizer.from_dir("../shared/data/tokenizer/kogpt2-v1"); tok.decode(tok.encode("안녕하세요"))
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from ..errors import UserError

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a SentencePiece byte-fallback piece, <0x00>..<0xFF>


def _convention(tok: tokenizers.Tokenizer) -> dict[str, str | None]:
    # special tokens by model family, recognised from the vocabulary
    def has(token: str) -> bool:
        return tok.token_to_id(token) is not None

    if has("[BOS]"):  # KakaoBrain KoGPT; its card uses pad = eos when there is no [PAD]
        pad = "[PAD]" if has("[PAD]") else "[EOS]"
        return dict(bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]", pad_token=pad, mask_token="[MASK]")
    if has("<|endoftext|>"):  # GPT-2 byte-level (e.g. ksjae's KoGPT checkpoints)
        e = "<|endoftext|>"
        return dict(bos_token=e, eos_token=e, unk_token=e, pad_token=None, mask_token=None)
    if has("</s>"):  # SKT KoGPT2 model card (bos = eos = </s>), and train_tokenizer's own
        return dict(bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    return {}


class TokenizerError(UserError):
    """A tokenizer file that is missing, malformed or of an unsupported kind (the message names it)."""


def _json(f: Path) -> dict:
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{f} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise TokenizerError(f"{f} must hold a JSON object")
    return cfg


def _rust_tokenizer(f: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise TokenizerError(f"{f} is not a readable tokenizer.json ({e})") from None


def _read_config(path: Path) -> dict:
    # special tokens and model_max_length from HF tokenizer_config / special_tokens_map / config.json
    out: dict = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # HF: the map wins
        f = path / name
        cfg = _json(f) if f.is_file() else {}
        for key in SPECIAL_KEYS:
            if key in cfg:
                v = cfg[key]
                v = v.get("content") if isinstance(v, dict) else v
                if v is None or isinstance(v, str):
                    out[key] = v
        n = cfg.get("model_max_length")
        if isinstance(n, int) and n < 10**12:  # HF writes int(1e30) for "unknown"
            out["model_max_length"] = n
    f = path / "config.json"
    if "model_max_length" not in out and f.is_file():
        cfg = _json(f)
        n = next((cfg[k] for k in ("n_positions", "max_position_embeddings", "n_ctx") if k in cfg), None)
        if isinstance(n, int):
            out["model_max_length"] = n
    return out


def _byte_level_bpe(vocab: Path, merges: Path) -> tokenizers.Tokenizer:
    # what transformers' GPT2TokenizerFast builds from the same two files
    tok = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its special tokens (each a vocabulary entry or None)."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        mask_token: str | None = None,
        model_max_length: int | None = None,
    ):
        def known(token: str | None) -> str | None:  # a token missing from the vocabulary is None
            return token if token is not None and tokenizer.token_to_id(token) is not None else None

        self.tokenizer = tokenizer
        self.bos_token, self.eos_token, self.unk_token = known(bos_token), known(eos_token), known(unk_token)
        self.pad_token, self.mask_token = known(pad_token), known(mask_token)
        self.model_max_length = model_max_length

    @classmethod
    def _build(cls, tok: tokenizers.Tokenizer, *layers: dict) -> Tokenizer:
        # convention < tokenizer_config < special_tokens_map < keyword arguments
        kw: dict = _convention(tok)
        for layer in layers:
            unknown = set(layer) - {*SPECIAL_KEYS, "model_max_length"}
            if unknown:
                raise TypeError(f"unknown tokenizer options: {sorted(unknown)}")
            kw.update(layer)
        return cls(tok, **kw)

    @classmethod
    def from_file(cls, tokenizer_json_path: str | os.PathLike, **special_tokens) -> Tokenizer:
        """Load a tokenizer.json; special tokens follow the family convention unless given."""
        path = Path(tokenizer_json_path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        return cls._build(_rust_tokenizer(path), special_tokens)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, **special_tokens) -> Tokenizer:
        """Load a folder with tokenizer.json, or with GPT-2 byte-level vocab.json + merges.txt.

        tokenizer_config.json / special_tokens_map.json (values str or {"content": ...}) override the
        family convention; keyword arguments (bos_token=..., model_max_length=...) override both.
        """
        path = Path(path)
        if path.is_file():
            return cls.from_file(path, **special_tokens)
        config = _read_config(path)
        if (path / "tokenizer.json").is_file():
            return cls._build(_rust_tokenizer(path / "tokenizer.json"), config, special_tokens)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            try:
                bpe = _byte_level_bpe(path / "vocab.json", path / "merges.txt")
            except Exception as e:  # tokenizers raises a bare Exception for malformed files
                raise TokenizerError(f"{path}: unreadable vocab.json / merges.txt ({e})") from None
            tok = cls._build(bpe, config, special_tokens)
            specials = {t for t in (getattr(tok, k) for k in SPECIAL_KEYS) if t is not None}
            tok.tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(specials)])
            return tok
        raise TokenizerError(f"{path}: no tokenizer (tokenizer.json, or vocab.json + merges.txt)")

    @property
    def start_id(self) -> int | None:
        """The id a document starts after: BOS, else EOS (the separator between training documents)."""
        return self.bos_id if self.bos_id is not None else self.eos_id

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def unk_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def pad_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def mask_id(self) -> int | None:
        return self._id(self.mask_token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        specials = ", ".join(f"{k}={getattr(self, k)!r}" for k in SPECIAL_KEYS)
        return f"Tokenizer(vocab_size={self.vocab_size}, {specials})"

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special tokens only when add_bos (literal "</s>" in text still matches)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids) if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """`encode` for many texts at once (parallel in Rust)."""
        encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos(e.ids) if add_bos else e.ids for e in encs]

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.bos_id is None:
            raise ValueError("add_bos=True but this tokenizer has no bos token")
        return [self.bos_id, *ids]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (any iterable of ints, e.g. a list or a 1-D tensor)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tokenizer.id_to_token(int(i))

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for HF loaders."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path / "tokenizer.json"))
        specials = {k: getattr(self, k) for k in SPECIAL_KEYS if getattr(self, k) is not None}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "clean_up_tokenization_spaces": False}
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
            (path / name).write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    def hash(self) -> str:
        """sha256 of the canonical tokenizer.json (same for the same vocab, merges and pipeline)."""
        canon = json.dumps(json.loads(self.tokenizer.to_str()), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """The ids decode(skip_special_tokens=True) drops."""
        return frozenset(i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special)

    @cached_property
    def byte_ids(self) -> frozenset[int]:
        """The ids of byte-fallback pieces <0x00>..<0xFF> (empty for a tokenizer without them)."""
        return frozenset(i for t, i in self.tokenizer.get_vocab().items() if BYTE_PIECE.fullmatch(t))
