"""Tokenizers for Korean GPT models: loading, training and streaming detokenization.

`Tokenizer` wraps a Rust `tokenizers.Tokenizer` (tokenizer.json, or GPT-2 vocab.json + merges.txt)
plus the family's special tokens (SKT KoGPT2, KakaoBrain KoGPT, GPT-2 byte-level). `train_tokenizer`
builds a SentencePiece-style Korean BPE (NFC, Metaspace `▁`, byte fallback) whose round trip is exact;
`StreamDecoder` turns generated ids into text without ever splitting a character.

    tok = Tokenizer.from_dir("../shared/data/tokenizer/kogpt2-v1"); tok.decode(tok.encode("안녕하세요"))
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ..errors import UserError

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")
# SKT KoGPT2 order, so ids are stable: <s>=0 </s>=1 <unk>=2 <pad>=3 <mask>=4 <unused0>=5 ... <unused99>=104
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>", "<mask>") + tuple(f"<unused{i}>" for i in range(100))
# single-token emoji and emoticons (added tokens, not special: decode never skips them)
EMOTICONS = (
    "😀", "😁", "😂", "😃", "😄", "😅", "😆", "😉", "😊", "😍", "😘", "😢", "😭", "😤", "😡",
    "🤣", "🙏", "👍", "👏", "🙂", "🥰", "😎", "🤔", "😱", "😳", "😇", "🔥", "✨", "💕",
    "❤️", "❤", "♥",  # with and without the emoji variation selector U+FE0F
    ":-)", ":)", "-)", "(-:", ":(", ":-(", ";)", "^^", "^_^", "^-^", "-_-",
    "ㅋㅋ", "ㅎㅎ", "ㅠㅠ", "ㅜㅜ", "ㅡㅡ", "ㄷㄷ",
)  # fmt: skip
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))  # SentencePiece byte-fallback pieces
MIN_LEARNED = 100  # train_tokenizer needs room for at least this many learned pieces
_BYTE_RE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_META = "\u2581"  # ▁ marks a space, as in SentencePiece
# A literal ▁ in the input is escaped to U+2126 OHM SIGN: NFC maps U+2126 to U+03A9, so after NFC
# the sign can only be our escape, and the decoder turns it back into ▁ (exact round trip).
_ESCAPE = "\u2126"


def _korean_pipeline(tok: tokenizers.Tokenizer) -> None:
    # NFC, not NFKC (NFKC turns ㅋ U+314B into conjoining ᄏ U+110F). Metaspace "first" adds the
    # dummy ▁ only before the first piece of the text and skips it when the text already starts with
    # ▁, so a leading space is kept by a "\A " -> "▁ " rewrite (needs normalized added tokens, see
    # train_tokenizer). The decoder is Llama's (Replace ▁, ByteFallback, Fuse, Strip one space).
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(_META, _ESCAPE), normalizers.Replace(Regex(r"\A "), _META + " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_META, prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(_META, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Replace(_ESCAPE, _META),
            decoders.Strip(" ", 1, 0),
        ]
    )


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
    def _special_ids(self) -> frozenset[int]:  # the ids decode(skip_special_tokens=True) drops
        return frozenset(i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special)

    @cached_property
    def _byte_ids(self) -> frozenset[int]:  # byte-fallback pieces <0x00>..<0xFF>
        return frozenset(i for t, i in self.tokenizer.get_vocab().items() if _BYTE_RE.fullmatch(t))


def _lines(paths: Sequence[Path]) -> Iterator[str]:
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line


def _alphabet(paths: Sequence[Path], limit: int) -> list[str]:
    # The `limit` most frequent characters, ties broken by code point. BpeTrainer's own
    # limit_alphabet breaks ties in hash order, which made training non-deterministic.
    counts: Counter[str] = Counter()
    for line in _lines(paths):
        counts.update(unicodedata.normalize("NFC", line))
    if not counts:
        return []
    counts[_ESCAPE] += counts.pop(_META, 0)  # the normalizer's rewrites: ▁ -> U+2126, space -> ▁
    counts.pop(" ", None)
    ranked = sorted(counts, key=lambda c: (-counts[c], c))
    return [_META, *ranked[:limit]]


def train_tokenizer(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    vocab_size: int = 51200,
    *,
    min_frequency: int = 2,
    show_progress: bool = True,
    limit_alphabet: int | None = None,
    max_token_length: int | None = 16,
    added_tokens: Sequence[str] = EMOTICONS,
) -> Tokenizer:
    """Train a SentencePiece-style Korean BPE (KoGPT2 layout) on text files, one example per line.

    Ids: SPECIAL_TOKENS (<s>=0 </s>=1 <unk>=2 <pad>=3 <mask>=4 <unused0..99>), then `added_tokens`
    (emoji/emoticons as single tokens), then the 256 byte pieces <0x00>..<0xFF> (byte fallback, so
    nothing ever becomes <unk>), then learned pieces. `vocab_size` counts all of them; the result has
    exactly `vocab_size` ids unless the corpus runs out of pairs seen `min_frequency` times (then fewer).
    `limit_alphabet` (default: half the learned budget) caps the characters kept; the rest fall back
    to bytes. decode(encode(x)) == NFC(x) for every string x.
    """
    paths = [Path(files)] if isinstance(files, (str, os.PathLike)) else [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"training file not found: {p}")
    reserved = list(dict.fromkeys([*SPECIAL_TOKENS, *added_tokens, *BYTE_TOKENS]))
    budget = vocab_size - len(reserved)
    if budget < MIN_LEARNED:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: {len(reserved)} ids are reserved ({len(SPECIAL_TOKENS)} special, "
            f"{len(reserved) - len(SPECIAL_TOKENS) - 256} added, 256 bytes) and at least {MIN_LEARNED} are needed "
            f"for learned pieces; use vocab_size >= {len(reserved) + MIN_LEARNED}"
        )
    alphabet = _alphabet(paths, limit_alphabet if limit_alphabet is not None else budget // 2)
    if not alphabet:
        raise ValueError(f"no text to train on: all of {[str(p) for p in paths]} are empty")

    base = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    _korean_pipeline(base)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,  # room for learned pieces that duplicate reserved ones (e.g. "ㅋㅋ")
        min_frequency=min_frequency,
        show_progress=show_progress,
        limit_alphabet=len(alphabet),
        initial_alphabet=alphabet,
        max_token_length=max_token_length,
    )
    base.train_from_iterator(_lines(paths), trainer)
    learned = json.loads(base.to_str())["model"]

    reserved_set = set(reserved)
    ranked = sorted(learned["vocab"], key=learned["vocab"].__getitem__)  # alphabet first, then merges
    pieces = [p for p in ranked if p not in reserved_set][:budget]
    vocab = {p: i for i, p in enumerate(reserved + pieces)}
    merges = []
    for m in learned["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ")
        # a merge may not build a byte-piece name: ByteFallback would decode "<0x41>" as "A"
        if a in vocab and b in vocab and a + b in vocab and not _BYTE_RE.fullmatch(a + b):
            merges.append((a, b))

    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    _korean_pipeline(tok)
    # normalized=True: added tokens are matched after normalizing the whole text, so "\A " sees only
    # the true start of the text, not the start of each piece between added tokens
    tok.add_special_tokens([AddedToken(t, special=True, normalized=True) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=True) for t in added_tokens])
    return Tokenizer._build(tok)


class StreamDecoder:
    """Incremental detokenizer: push ids one at a time, get back only finalized text.

    Text is held back while it ends in "\\ufffd" (an incomplete UTF-8 sequence) or in a run of
    byte-fallback pieces (a later byte could still change how the whole run decodes), so a Hangul
    syllable or emoji is never split; the pieces plus flush() always equal decode(all ids). Each push
    decodes only a small window: the ids since the last emitted boundary plus one emitted chunk of
    left context (which keeps Metaspace's leading-space handling identical to a full decode).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, context: Sequence[int] = ()):
        """context: ids already shown (e.g. the prompt's last few), so the first piece keeps the
        space a word-initial `▁` stands for: pieces equal decode(context + ids)[len(decode(context)):]."""
        self.tok = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._drop = tokenizer._special_ids if skip_special_tokens else frozenset()
        self._context = [int(i) for i in context if int(i) not in self._drop][-8:]
        self._reset()

    def _reset(self) -> None:
        self._ids: list[int] = list(self._context)  # window: left context ids[:read], then not-yet-emitted ids
        self._read = len(self._ids)
        self._prefix = self._decode(self._ids)  # decode(ids[:read])

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it finalized (often "")."""
        token_id = int(token_id)
        if token_id in self._drop or self.tok.id_to_token(token_id) is None:
            return ""  # decode() drops these too; keeping them out keeps every window id non-empty
        self._ids.append(token_id)
        end = len(self._ids)
        while end > self._read and self._ids[end - 1] in self.tok._byte_ids:
            end -= 1
        if end == self._read:
            return ""
        text = self._decode(self._ids[:end])
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self._prefix) :]
        self._ids = self._ids[self._read :]  # keep the chunk emitted last as left context
        self._read = end - self._read
        self._prefix = self._decode(self._ids[: self._read])
        return piece

    def flush(self) -> str:
        """Return the remaining text at the end of the stream and start afresh."""
        text = self._decode(self._ids)[len(self._prefix) :]
        self._reset()
        return text
