"""The OpenAI wire format: request models (pydantic, strict), error bodies, response / chunk builders.

Requests are validated strictly (no "1" for 1, unknown fields refused) so a typo is a 400, not a
silently ignored option. Beyond OpenAI's fields, the kogpt extensions top_k, min_p, typical_p,
repetition_penalty and no_repeat_ngram_size take transformers' semantics (kogpt.generation.sampling);
speculate sets speculative decoding's draft length (kogpt.generation.speculative).
Builders return plain dicts in the shapes of /v1/completions and /v1/chat/completions.

    body = CompletionRequest.model_validate({"prompt": "안녕", "max_tokens": 8})
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..text.tokenizer import Tokenizer

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty", "no_repeat_ngram_size")
_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_UNION_BRANCH = re.compile(r"str|int|list\[.*\]")  # pydantic names a union's branch in an error's loc


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class PPLMOptions(_Strict):
    """PPLM knobs (kogpt.generation.steering.PPLMConfig), bounded so one request cannot hog the server."""

    stepsize: float | None = Field(None, ge=0, le=1)
    num_iterations: int | None = Field(None, ge=0, le=10)
    kl_scale: float | None = Field(None, ge=0)
    gm_scale: float | None = Field(None, ge=0, le=1)
    gamma: float | None = Field(None, ge=0)
    window_length: int | None = Field(None, ge=0)
    grad_length: int | None = Field(None, ge=0)

    def knobs(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class _Common(_Strict):
    model: str | None = None  # the base's id or an adapter's name (GET /v1/models); unset: the default
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)  # 0 = greedy; unset = the model's default
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)  # accepted for compatibility; only 0 is supported
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # kogpt extensions (transformers' semantics)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    no_repeat_ngram_size: int | None = Field(None, ge=0)
    # PPLM steering: a bundled topic name or a list of words (never a server-side file), and its knobs
    bow: str | list[str] | None = None  # checked by the handler (topic names, 1-500 words of 1-50 characters)
    pplm: PPLMOptions | None = None
    speculate: int | None = Field(None, ge=0, le=16)  # speculative decoding's draft length; unset: kogpt serve --speculate

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def sampling_overrides(self) -> dict:
        return {k: getattr(self, k) for k in SAMPLING_KEYS}


class CompletionRequest(_Common):
    # text, texts, token ids or lists of token ids (ids checked against the vocabulary by the handler)
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=0)


# -- errors and parsing ---------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(self.body(), self.status, headers=headers)


def invalid_body(errors: list[dict]) -> APIError:
    """A 400 naming the first invalid field (FastAPI's / pydantic's error list)."""
    err = errors[0]
    if err.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and not isinstance(p, int)]
    loc = [p for p in loc if not _UNION_BRANCH.fullmatch(p)]
    where = ".".join(loc) or "body"
    return APIError(400, f"{where}: {err.get('msg')}", param=loc[0] if loc else None)


# -- responses ---------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, rid: str, model: str, choices: list[dict], created: int | None = None) -> dict:
    """The common outer object of responses and stream chunks."""
    return {"id": rid, "object": kind, "created": created or int(time.time()), "model": model, "choices": choices}


class TokenText:
    """Token ids as the text OpenAI's logprobs show ("bytes:\\xNN" for a byte-fallback piece)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        # decode a token after an anchor token, so a leading-space marker (▁) shows as the space it is
        self.anchor = (tokenizer.encode("a") or [None])[-1]
        self.prefix = tokenizer.decode([self.anchor]) if self.anchor is not None else ""

    def __call__(self, i: int) -> tuple[str, bytes]:
        m = _BYTE.fullmatch(self.tok.id_to_token(i) or "")
        if m:
            return f"bytes:\\x{m.group(1).lower()}", bytes([int(m.group(1), 16)])
        s = self.tok.decode([i])
        if self.anchor is not None:
            pair = self.tok.decode([self.anchor, i])
            if pair.startswith(self.prefix):
                s = pair[len(self.prefix):]
        return s, s.encode("utf-8")

    def completion(self, ids: list[int], lps: list[float | None], tops: list, offset: int, top_n: int) -> dict:
        """The `logprobs` object of a completion choice (legacy format); None entries (an echoed prompt's
        first token) stay null."""
        tokens = [self(i)[0] for i in ids]
        offsets = []
        for i, t in zip(ids, tokens):  # where each token's text starts (special tokens add none)
            offsets.append(offset)
            skipped = self.tok.decode([i], skip_special_tokens=True) == "" != self.tok.decode([i])
            offset += 0 if t.startswith("bytes:") or skipped else len(t)
        top = [None if alts is None else {self(t)[0]: lp for t, lp in alts} for alts in tops] if top_n else None
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}

    def chat(self, ids: list[int], lps: list[float], tops: list) -> dict:
        """The `logprobs` object of a chat choice."""
        def entry(i: int, lp: float) -> dict:
            s, b = self(i)
            return {"token": s, "logprob": lp, "bytes": list(b)}

        return {"content": [dict(entry(i, lp), top_logprobs=[entry(t, tlp) for t, tlp in alts])
                            for i, lp, alts in zip(ids, lps, tops)]}
