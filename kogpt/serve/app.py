"""The HTTP app: `create_app(gpt)` builds one server's state, mounts its routes and guard, maps errors.

Where each endpoint lives:
  POST /v1/completions, /v1/chat/completions   completions.py (validate → plan → Scheduler → JSON or SSE)
  GET /, /health, /metrics, /v1/models         info.py
  bearer key, body limit, request counting     guard.py (pure ASGI, in front of every route)
The shared state (model, Scheduler, Metrics, template, limits) is one ServerState on app.state.server.
Every error is an OpenAI error body: UserError and bad input are 400 (FastAPI validates each body
against its pydantic model; the handler below words the error), a full queue 429 at once, a wrong
method 405 with `Allow`. Request and response models are all in /openapi.json (schema.py).

    uvicorn.run(create_app(KoGPT.from_pretrained("kogpt-mini")), host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from ..api import KoGPT
from ..errors import UserError
from . import completions, info
from ..text.chat import ChatTemplate
from .guard import Guard, route_label
from .protocol import APIError, TokenText, invalid_body
from .scheduler import Scheduler
from .state import ServerState, server
from .telemetry import Metrics

log = logging.getLogger("kogpt.serve")


def create_app(gpt: KoGPT, *, max_batch_size: int = 8, max_queue: int = 64, max_tokens_limit: int | None = None,
               api_key: str | None = None, chat_template: ChatTemplate | None = None,
               max_body_bytes: int = 1 << 20, step_fn=None, chat_model: str | None = None,
               served_model_name: str | None = None) -> FastAPI:
    """The server for one model and the adapters added to it (KoGPT.add_adapter), each a model of its own
    name; its engine thread starts now and stops with the app's lifespan. served_model_name: the id the base
    answers to (default: gpt.name). chat_model: the model /v1/chat/completions uses when a request names none
    (default: the base)."""
    base = served_model_name or gpt.name
    if base in gpt.adapters:
        raise UserError(f"the served model name {base!r} is also an adapter's")
    if chat_model not in (None, base, *gpt.adapters):
        raise UserError(f"chat model {chat_model!r} is neither the base ({base!r}) nor an added adapter")
    metrics = Metrics()
    scheduler = Scheduler(gpt, max_batch_size, max_queue, metrics, step_fn or gpt.step_fn)
    ctx = scheduler.max_len
    limit = min(max_tokens_limit or ctx, ctx)
    if limit < 1:
        raise UserError(f"max_tokens_limit must be >= 1, got {max_tokens_limit}")
    state = ServerState(gpt, scheduler, metrics, chat_template or ChatTemplate.default(), TokenText(gpt.tokenizer),
                        base, ctx, limit, max_batch_size, max_queue, chat_model or base)
    metrics.gauge("kogpt_queue_depth", "Sequences waiting for a free batch slot", lambda: scheduler.waiting)
    metrics.gauge("kogpt_running_sequences", "Sequences decoding now (the current batch size)", lambda: scheduler.running)
    metrics.gauge("kogpt_batch_slots", "Batch slots (--max-batch-size)", lambda: max_batch_size)

    app = FastAPI(title="kogpt serve", version="1", lifespan=_lifespan, docs_url="/docs", redoc_url=None,
                  exception_handlers={APIError: _api_error, UserError: _user_error,
                                      RequestValidationError: _invalid, HTTPException: _http_error,
                                      Exception: _crash})
    app.state.server = state
    app.add_middleware(Guard, metrics=metrics, api_key=api_key, max_body=max_body_bytes)
    app.include_router(info.router)
    app.include_router(completions.router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    app.state.server.scheduler.close()  # stop the engine thread with the app


# -- errors: every one an OpenAI error body ------------------------------------------------------
async def _api_error(request: Request, e: APIError):
    return e.response()


async def _user_error(request: Request, e: UserError):
    return APIError(400, str(e)).response()


async def _invalid(request: Request, e: RequestValidationError):
    return invalid_body(e.errors()).response()


async def _http_error(request: Request, e: HTTPException):
    if e.status_code == 400 and isinstance(e.__cause__, ValueError):  # FastAPI could not decode the body
        return APIError(400, f"the body is not valid JSON: {e.__cause__}").response()
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    response = APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", type=kind).response()
    response.headers.update(e.headers or {})  # 405 carries Allow
    return response


async def _crash(request: Request, e: Exception):
    # answered by Starlette's outermost middleware, past the Guard: count the 500 here
    log.exception("request failed")
    server(request).metrics.requests.labels(route_label(request.url.path), "500").inc()
    return APIError(500, "internal server error (see the server log)", type="server_error").response()
