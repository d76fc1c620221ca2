"""Perplexity of documents: bits per byte, bits per character and token perplexity.

Each document is scored after the start token in sliding windows of the model's context (or
--max-length) that score every token once, keeping the previous window's tail as context, as
transformers' perplexity guide does. Bits per byte compare across tokenizers; token perplexity does not.

    result = evaluate_perplexity(gpt, read_documents("heldout.txt"), stride=512)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from .. import __version__
from ..data.corpus import read_documents as document_units
from ..data.corpus import scan
from ..errors import UserError
from .scoring import context_length, score_all, start_id


def read_documents(path: str | os.PathLike) -> list[str]:
    """The documents of a text file as `kogpt prepare` reads them (kogpt.data.corpus): a blank line ends a
    document, a file without blank lines holds one per line; lines NFC, stripped, joined by newlines."""
    return ["\n".join(units) for units, _ in document_units(scan(Path(path)))]


def sliding_windows(ids: Sequence[int], window: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(context, targets) pieces that score ids[1:] exactly once, each piece at most `window` tokens.

    The first piece is ids[:window]; each next one moves `stride` tokens on and keeps the previous
    window - stride tokens as context (as transformers' perplexity guide).
    """
    if not 1 <= stride < window:
        raise UserError(f"the stride must be in [1, {window - 1}] (below the window), got {stride}")
    end = min(window, len(ids))
    out = [(list(ids[:1]), list(ids[1:end]))] if len(ids) > 1 else []
    while end < len(ids):
        new_end = min(end + stride, len(ids))
        out.append((list(ids[new_end - window:end]), list(ids[end:new_end])))
        end = new_end
    return out


def evaluate_perplexity(gpt, documents: Sequence[str], *, max_length: int | None = None, stride: int | None = None,
                        batch_size: int = 8) -> dict:
    """Bits per UTF-8 byte, bits per character and token perplexity of `documents`.

    Each document is scored after the start token (start_id) in windows of max_length tokens
    (default: the model's context) moving by `stride` (default: half the window). The end-of-text
    token is not scored; bytes and characters are those of the documents as given.
    """
    window = context_length(gpt.model, max_length)
    stride = window // 2 if stride is None else stride
    start = start_id(gpt.tokenizer)
    pieces: list[tuple[int, list[int], list[int]]] = []
    for d, ids in enumerate(gpt.tokenizer.encode_batch(list(documents))):
        pieces += [(d, c, t) for c, t in sliding_windows([start, *ids], window, stride)]
    scores = score_all(gpt.model, [c for _, c, _ in pieces], [[t] for _, _, t in pieces], batch_size, "perplexity")
    per_doc = [{"doc": d, "tokens": 0, "bytes": len(text.encode()), "chars": len(text), "nats": 0.0}
               for d, text in enumerate(documents)]
    for (d, _, targets), [nats] in zip(pieces, scores):
        per_doc[d]["tokens"] += len(targets)
        per_doc[d]["nats"] -= nats
    nats, tokens = sum(p["nats"] for p in per_doc), sum(p["tokens"] for p in per_doc)
    nbytes, chars = sum(p["bytes"] for p in per_doc), sum(p["chars"] for p in per_doc)
    if not tokens:
        raise UserError("no tokens to score: the documents are empty")
    metrics = {"bits_per_byte": nats / math.log(2) / nbytes, "bits_per_char": nats / math.log(2) / chars,
               "token_perplexity": math.exp(nats / tokens), "nats_per_token": nats / tokens}
    return {"model": gpt.name, "task": "perplexity", "kogpt_version": __version__, "max_length": window,
            "stride": stride, "n": len(documents), "tokens": tokens, "bytes": nbytes, "chars": chars,
            "metrics": metrics, "predictions": per_doc}
