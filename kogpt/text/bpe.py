"""Training a Korean BPE tokenizer in the SentencePiece/KoGPT2 layout, with an exact round trip.

`train_tokenizer` learns a BPE on text files behind a fixed id layout (special tokens, emoji and
emoticons, the 256 byte-fallback pieces, then learned pieces) and the Korean pipeline: NFC (not NFKC),
Metaspace `▁` and byte fallback, so nothing is ever `<unk>` and decode(encode(x)) == NFC(x).

    tok = train_tokenizer(["corpus.txt"], vocab_size=24576); tok.save("my-tokenizer")
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers

from .tokenizer import BYTE_PIECE, Tokenizer

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
_META = "\u2581"  # ▁ marks a space, as in SentencePiece
# A literal ▁ in the input is escaped to U+2126 OHM SIGN: NFC maps U+2126 to U+03A9, so after NFC
# the sign can only be our escape, and the decoder turns it back into ▁ (exact round trip).
_ESCAPE = "\u2126"


def reserved_tokens(added_tokens: Sequence[str] = EMOTICONS) -> list[str]:
    """The tokens before the learned pieces, in id order: special, added, then the 256 byte pieces."""
    return list(dict.fromkeys([*SPECIAL_TOKENS, *added_tokens, *BYTE_TOKENS]))


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
    reserved = reserved_tokens(added_tokens)
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
        if a in vocab and b in vocab and a + b in vocab and not BYTE_PIECE.fullmatch(a + b):
            merges.append((a, b))

    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    _korean_pipeline(tok)
    # normalized=True: added tokens are matched after normalizing the whole text, so "\A " sees only
    # the true start of the text, not the start of each piece between added tokens
    tok.add_special_tokens([AddedToken(t, special=True, normalized=True) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=True) for t in added_tokens])
    return Tokenizer._build(tok)
