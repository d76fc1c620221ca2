"""Streaming detokenization: generated ids in, finished text out, never a split character.

`StreamDecoder` is shared by KoGPT.stream, the CLI and the server. Ours, not tokenizers' DecodeStream
(0.23.3): ByteFallback decodes a run of byte pieces all or nothing, and DecodeStream emits a run's
first character early. kogpt-mini ids [1134, 388, 330, 285, 390, 7716] (▁ + 갃 in 3 bytes, a stray
<0xEC>, ▁가) decode to "���� 가"; DecodeStream sends "갃", then raises "Invalid prefix" at 가.

    sd = StreamDecoder(tok, context=prompt_ids); text = "".join(sd.push(i) for i in ids) + sd.flush()
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer


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
        self._drop = tokenizer.special_ids if skip_special_tokens else frozenset()
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
        while end > self._read and self._ids[end - 1] in self.tok.byte_ids:
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
