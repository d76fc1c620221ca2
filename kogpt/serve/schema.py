"""The response bodies of every route as pydantic models, for the OpenAPI schema (/openapi.json, /docs).

Handlers build plain dicts (protocol.py's builders); these models only describe them, so a client
generator or a fuzzer (schemathesis) learns each route's answers, errors included: `responses(...)`
gives a route's documented statuses with OpenAI's error body. tests/test_serve_clients.py checks
the served schema against the server's real answers.

    @router.post("/v1/completions", responses=responses(Completion, 400, 401, 413, 429, stream=True))
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body, answered with every 4xx and 5xx."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy layout: one entry per token; an echoed prompt's first token has null logprobs."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None  # "stop" or "length"; null in a stream until the choice ends


class Completion(BaseModel):
    """POST /v1/completions (and each `data:` chunk of its stream, with `usage` only on the last)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    """POST /v1/chat/completions without stream (a stream sends chat.completion.chunk objects)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    """GET /v1/models/{name}: a served model (the base or an adapter), its limits, sampling defaults and chat
    template."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None  # an adapter's base model (vLLM's field); None for the base
    chat_default: bool  # the model /v1/chat/completions uses when a request names none
    max_model_len: int
    max_tokens_limit: int
    defaults: dict[str, float | int | None]
    chat_template: dict[str, str | list[str]]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    """GET /health: 200 while the engine thread runs, 503 once it has died."""

    status: Literal["ok", "error"]
    model: str
    running: int
    waiting: int
    max_batch_size: int
    max_queue: int


_WHY = {400: "invalid request: malformed JSON, a wrong type, a value out of range, a prompt too long",
        401: "missing or wrong API key (a server started with --api-key)",
        404: "no such model", 413: "request body over --max-body-size",
        429: "the queue is full; retry after the Retry-After seconds", 503: "the engine thread has died"}


_SSE_EVENT = {  # each event of a stream: its `data` is one chunk as JSON, the last one `[DONE]`
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a chunk (JSON) or [DONE]"}, "event": {"type": "string"}}}


def responses(model: type[BaseModel], *statuses: int, stream: bool = False) -> dict:
    """A route's `responses=`: 200 with `model` (also as an SSE stream when `stream`), then errors(*statuses)."""
    ok: dict = {"model": model, "description": "OK"}
    if stream:
        ok["content"] = {"text/event-stream": {"schema": _SSE_EVENT}}
    return {200: ok, **errors(*statuses)}


def errors(*statuses: int) -> dict:
    """Documented error statuses: OpenAI's error body (503 of /health: its Health body)."""
    return {status: {"model": Health if status == 503 else ErrorResponse, "description": _WHY[status]}
            for status in statuses}
