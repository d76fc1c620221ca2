"""The HTTP app: OpenAI-compatible routes, the web playground, health and Prometheus metrics.

`create_app(gpt)` returns a FastAPI app whose handlers validate a request (kogpt.serve.protocol),
turn it into sequences for the Scheduler (the background engine thread) and answer with a JSON body
or an SSE stream (`data: {...}` chunks, then `data: [DONE]`). Every error is an OpenAI error body;
UserError and bad input are 400, a full queue 429 at once. A pure-ASGI guard in front checks the
bearer key, limits the body size and counts requests by status.

    uvicorn.run(create_app(KoGPT.from_pretrained("kogpt-mini")), host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..api import KoGPT
from ..errors import UserError
from ..generation.steering import TOPICS
from .chat import ChatTemplate
from .telemetry import Metrics
from .protocol import (APIError, ChatRequest, CompletionRequest, TokenText, envelope, invalid_body, new_id,
                       parse_body, request_schema, usage)
from .scheduler import Job, QueueFull, Scheduler, SeqSpec

STATIC = Path(__file__).parent / "static"
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
log = logging.getLogger("kogpt.serve")


def create_app(gpt: KoGPT, *, max_batch_size: int = 8, max_queue: int = 64, max_tokens_limit: int | None = None,
               api_key: str | None = None, chat_template: ChatTemplate | None = None,
               max_body_bytes: int = 1 << 20, step_fn=None) -> FastAPI:
    """The server for one model; its engine thread starts now and stops with the app's lifespan."""
    metrics = Metrics()
    scheduler = Scheduler(gpt, max_batch_size, max_queue, metrics, step_fn or gpt.step_fn)
    template = chat_template or ChatTemplate.default()
    ctx = scheduler.max_len
    limit = min(max_tokens_limit or ctx, ctx)
    if limit < 1:
        raise UserError(f"max_tokens_limit must be >= 1, got {max_tokens_limit}")
    model_id = gpt.name
    token_text = TokenText(gpt.tokenizer)
    metrics.gauge("kogpt_queue_depth", "Sequences waiting for a free batch slot", lambda: scheduler.waiting)
    metrics.gauge("kogpt_running_sequences", "Sequences decoding now (the current batch size)", lambda: scheduler.running)
    metrics.gauge("kogpt_batch_slots", "Batch slots (--max-batch-size)", lambda: max_batch_size)

    @asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()

    app = FastAPI(title="kogpt serve", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.scheduler, app.state.metrics, app.state.template = scheduler, metrics, template
    app.add_middleware(_Guard, metrics=metrics, api_key=api_key, max_body=max_body_bytes)

    # -- errors ------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(UserError)
    async def _user_error(request, e: UserError):
        return APIError(400, str(e)).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return invalid_body(e.errors()).response()

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", type=kind).response()

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        log.exception("request failed")
        metrics.requests.inc(1, _route(request.url.path), "500")
        return APIError(500, "internal server error (see the server log)", type="server_error").response()

    # -- plain routes ------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/health")
    async def health():
        body = {"status": "ok" if scheduler.alive else "error", "model": model_id, "running": scheduler.running,
                "waiting": scheduler.waiting, "max_batch_size": max_batch_size, "max_queue": max_queue}
        return JSONResponse(body, 200 if scheduler.alive else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        s = gpt.defaults.sampling
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "kogpt", "max_model_len": ctx,
                "max_tokens_limit": limit,
                "defaults": {"temperature": s.temperature if s.do_sample else 0.0, "top_p": s.top_p, "top_k": s.top_k,
                             "repetition_penalty": s.repetition_penalty},
                "chat_template": dict(template.describe(), note="base model without a chat template of its own: "
                                      "/v1/chat/completions renders messages with this template")}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            raise APIError(404, f"model {name!r} not found; this server serves {model_id!r}", "model",
                           "model_not_found", type="not_found_error")
        return model_card()

    # -- generation --------------------------------------------------------------------------------
    def plan(body, prompts: list[str], stops: list[str], max_tokens: int | None, logprobs: int | None,
             prompt_param: str) -> list[SeqSpec]:
        if body.presence_penalty or body.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported; use repetition_penalty",
                           "presence_penalty" if body.presence_penalty else "frequency_penalty")
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        if len(body.stops()) > 4:
            raise APIError(400, f"at most 4 stop sequences, got {len(body.stops())}", "stop")
        if max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {limit}", "max_tokens")
        overrides = body.sampling_overrides()
        steer = None
        if body.bow is not None:
            if isinstance(body.bow, str) and body.bow not in TOPICS and body.bow not in TOPICS.values():
                raise APIError(400, f"bow must be a list of words or a bundled topic: {', '.join(TOPICS)}", "bow")
            if isinstance(body.bow, list) and not (0 < len(body.bow) <= 500 and all(0 < len(w) <= 50 for w in body.bow)):
                raise APIError(400, "bow must hold 1 to 500 words of 1 to 50 characters", "bow")
            try:
                steer = gpt.steerers(body.bow, body.pplm.knobs() if body.pplm else None, len(prompts) * body.n)
            except UserError as e:
                raise APIError(400, str(e), "bow") from None
        elif body.pplm is not None:
            raise APIError(400, "pplm options need bow (a topic name or a list of words)", "pplm")
        sampling, max_new, max_len = gpt.options(steering=body.bow is not None, **overrides)
        specs = []
        for prompt in prompts:
            ids = gpt.encode_prompt(prompt)
            if len(ids) >= ctx:
                raise APIError(400, f"the prompt has {len(ids)} tokens; the model's context holds {ctx}",
                               prompt_param, "context_length_exceeded")
            if max_tokens is None:  # the model's default length recipe, at least 16 tokens
                default = max_new or (max_len - len(ids) if max_len else ctx)
                budget = min(max(default, 16), limit, ctx - len(ids))
            elif len(ids) + max_tokens > ctx:
                raise APIError(400, f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}: more than "
                               f"the model's context of {ctx}", "max_tokens", "context_length_exceeded")
            else:
                budget = max_tokens
            for j in range(body.n):
                seed = None if body.seed is None else (body.seed + j) % (1 << 64)  # torch takes 64-bit seeds
                specs.append(SeqSpec(ids, budget, sampling, stops, seed, logprobs,
                                     None if steer is None else steer[len(specs)]))
        return specs

    def submit(specs: list[SeqSpec]) -> Job:
        try:
            return scheduler.submit(specs)
        except QueueFull as e:
            raise APIError(429, str(e), code="rate_limit_exceeded", type="rate_limit_error") from None

    @app.post("/v1/completions", openapi_extra=request_schema(CompletionRequest))
    async def completions(request: Request):
        body = await parse_body(request, CompletionRequest)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt is an empty list", "prompt")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported", "echo")
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of other than n is not supported", "best_of")
        if body.suffix:
            raise APIError(400, "suffix (insertion) is not supported", "suffix")
        specs = plan(body, prompts, body.stops(), body.max_tokens, body.logprobs, "prompt")
        job = submit(specs)
        return await respond(request, body, job, specs, "text_completion",
                             echo=[p for p in prompts for _ in range(body.n)] if body.echo else None)

    @app.post("/v1/chat/completions", openapi_extra=request_schema(ChatRequest))
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatRequest)
        prompt, stops = template.render([{"role": m.role, "content": m.text()} for m in body.messages])
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        specs = plan(body, [prompt], stops + body.stops(), max_tokens, logprobs, "messages")
        return await respond(request, body, submit(specs), specs, "chat.completion")

    async def respond(request: Request, body, job: Job, specs: list[SeqSpec], kind: str,
                      echo: list[str] | None = None):
        rid, created = new_id("cmpl" if kind == "text_completion" else "chatcmpl"), int(time.time())
        chat = kind == "chat.completion"
        top_n = specs[0].logprobs
        want_lp = top_n is not None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _SSE(job, sse(job, rid, created, chat, echo, top_n, include_usage))
        watcher = asyncio.create_task(_disconnected(request.receive, job))
        texts, tokens, lps, tops = ([[] for _ in specs] for _ in range(4))
        finish, completion_tokens = [None] * len(specs), 0
        try:
            async for p in job:
                texts[p.index].append(p.text)
                tokens[p.index] += p.token_ids
                lps[p.index] += p.logprobs
                tops[p.index] += p.top
                if p.finish:
                    finish[p.index], completion_tokens = p.finish, completion_tokens + p.completion_tokens
        finally:
            watcher.cancel()
            job.cancel()
        choices = []
        for i in range(len(specs)):
            text = "".join(texts[i])
            if chat:
                text = text.lstrip()
                lp = token_text.chat(tokens[i], lps[i], tops[i]) if want_lp else None
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                "finish_reason": finish[i]})
            else:
                lp = token_text.completion(tokens[i], lps[i], tops[i], 0, specs[i].logprobs) if want_lp else None
                choices.append({"index": i, "text": (echo[i] if echo else "") + text, "logprobs": lp,
                                "finish_reason": finish[i]})
        out = envelope(kind, rid, model_id, choices, created)
        out["usage"] = usage(job.prompt_tokens, completion_tokens)
        return out

    async def sse(job: Job, rid: str, created: int, chat: bool, echo, top_n: int | None, include_usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        started: set[int] = set()
        offsets = [len(e) for e in echo] if echo else [0] * job.n
        completion_tokens = 0

        def chunk(choices: list[dict], **extra) -> bytes:
            data = dict(envelope(kind, rid, model_id, choices, created), **extra)
            return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"

        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(job.n)])
            elif echo:
                yield chunk([{"index": i, "text": e, "logprobs": None, "finish_reason": None}
                             for i, e in enumerate(echo)])
            async for p in job:
                text = p.text
                if chat and p.index not in started:
                    text = text.lstrip()
                    if text:
                        started.add(p.index)
                completion_tokens += p.completion_tokens
                if not text and not p.finish:
                    continue
                finish = None if p.finish == "cancelled" else p.finish
                if chat:
                    lp = token_text.chat(p.token_ids, p.logprobs, p.top) if top_n is not None else None
                    choice = {"index": p.index, "delta": {"content": text} if text else {}, "logprobs": lp}
                else:
                    lp = None
                    if top_n is not None:
                        lp = token_text.completion(p.token_ids, p.logprobs, p.top, offsets[p.index], top_n)
                        offsets[p.index] += len(text)
                    choice = {"index": p.index, "text": text, "logprobs": lp}
                yield chunk([dict(choice, finish_reason=finish)])
            if include_usage:
                yield chunk([], usage=usage(job.prompt_tokens, completion_tokens))
        except Exception as e:  # the engine failed mid-stream: say so in the stream, as OpenAI does
            log.exception("stream failed")
            err = APIError(500, f"generation failed: {e}", type="server_error")
            yield b"data: " + json.dumps(err.body()).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return app


def _route(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models"
    return path if path in ROUTES else "other"


async def _disconnected(receive, job: Job) -> None:
    """Cancel `job` when the client disconnects (reads the ASGI receive channel after the body)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


class _SSE(StreamingResponse):
    """text/event-stream whose job is cancelled as soon as the client goes away."""

    def __init__(self, job: Job, chunks):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        watcher = asyncio.create_task(_disconnected(receive, self.job))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                if watcher.done():
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we were sending
            pass
        finally:
            watcher.cancel()
            self.job.cancel()
            await self.body_iterator.aclose()


class _Guard:
    """Pure ASGI middleware: bearer-key check, request body size limit, request counting."""

    def __init__(self, app, metrics: Metrics, api_key: str | None, max_body: int):
        self.app, self.metrics, self.max_body = app, metrics, max_body
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = _route(scope["path"])

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.inc(1, path, str(message["status"]))
            await send(message)

        headers = dict(scope["headers"])
        protected = scope["path"].startswith("/v1/") or scope["path"] == "/metrics"
        if self.expected and protected and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            err = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
            return await err.response()(scope, receive, counted)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body, ok = await _read_body(receive, headers, self.max_body)
            if not ok:
                err = APIError(413, f"the request body is larger than {self.max_body} bytes", code="body_too_large")
                return await err.response()(scope, receive, counted)
            receive = _replay(body, receive)
        await self.app(scope, receive, counted)


async def _read_body(receive, headers: dict, limit: int) -> tuple[bytes, bool]:
    declared = headers.get(b"content-length", b"")
    if declared.isdigit() and int(declared) > limit:
        return b"", False
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return b"", False
        if not message.get("more_body", False):
            break
    return b"".join(chunks), True


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
