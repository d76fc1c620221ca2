"""The generation routes: POST /v1/completions and POST /v1/chat/completions.

FastAPI validates the body (kogpt.serve.protocol's models; app.py turns errors into OpenAI's body),
`plan` turns it into one SeqSpec per prompt and choice (limits, context, PPLM steering, seeds), the
Scheduler runs them, and `respond` answers with one JSON body or an SSE stream (`data: {...}` chunks,
then `data: [DONE]`). `echo` with `logprobs` scores the prompt with kogpt eval's own scoring
(evaluation/scoring.prompt_scores). A client that goes away cancels its job at once, freeing the
batch rows. A full queue is a 429 straight away.

    app.include_router(completions.router)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import torch
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..errors import UserError
from ..evaluation.scoring import prompt_scores
from ..core.lora import routed
from ..generation.steering import TOPICS
from .protocol import APIError, ChatRequest, CompletionRequest, envelope, new_id, usage
from .scheduler import Job, Piece, QueueFull, SeqSpec
from .schema import ChatCompletion, Completion, responses
from .state import ServerState, server

log = logging.getLogger("kogpt.serve")
router = APIRouter()


@router.post("/v1/completions", responses=responses(Completion, 400, 401, 404, 413, 429, stream=True))
async def completions(request: Request, body: CompletionRequest):
    s = server(request)
    model = s.pick(body.model)
    sent = prompt_list(body.prompt)
    prompts = prompt_ids(s, sent)
    if body.best_of not in (None, body.n):
        raise APIError(400, "best_of other than n is not supported", "best_of")
    if body.suffix:
        raise APIError(400, "suffix (insertion) is not supported", "suffix")
    specs = plan(s, body, model, prompts, body.stops(), body.max_tokens, body.logprobs, "prompt")
    echo = None
    if body.echo:  # each choice starts with its prompt: the text as sent, or the ids decoded
        echo = [Echo(p if isinstance(p, str) else s.gpt.tokenizer.decode(ids), ids) for p, ids in zip(sent, prompts)]
        if body.logprobs is not None:
            await score_echo(s, echo, body.logprobs, s.adapter(model))
        echo = [e for e in echo for _ in range(body.n)]
    job = Finished(specs) if body.max_tokens == 0 else submit(s, specs)
    return await respond(s, request, body, model, job, specs, "text_completion", echo)


@router.post("/v1/chat/completions", responses=responses(ChatCompletion, 400, 401, 404, 413, 429, stream=True))
async def chat_completions(request: Request, body: ChatRequest):
    s = server(request)
    model = s.pick(body.model, chat=True)
    prompt, stops = s.template.render([{"role": m.role, "content": m.text()} for m in body.messages])
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    specs = plan(s, body, model, [s.gpt.encode_prompt(prompt)], stops + body.stops(), max_tokens, logprobs, "messages")
    job = Finished(specs) if max_tokens == 0 else submit(s, specs)
    return await respond(s, request, body, model, job, specs, "chat.completion")


# -- prompts and echo -----------------------------------------------------------------------------
def prompt_list(prompt: str | list) -> list[str | list[int]]:
    """A completion request's prompts: one text or one list of ids stands alone, a list holds several."""
    return [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt


def prompt_ids(s: ServerState, prompts: list[str | list[int]]) -> list[list[int]]:
    """The token ids of each prompt: texts encoded, token ids checked against the model's vocabulary."""
    if not prompts:
        raise APIError(400, "prompt is an empty list", "prompt")
    vocab = s.gpt.model.config.vocab_size
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(s.gpt.encode_prompt(p))
            continue
        if not p:
            raise APIError(400, "prompt holds an empty list of token ids", "prompt")
        bad = next((i for i in p if not 0 <= i < vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt holds token id {bad}, outside the model's vocabulary of {vocab} (0 to "
                           f"{vocab - 1})", "prompt")
        out.append(list(p))
    return out


@dataclass
class Echo:
    """The prompt part of a completion choice with echo: its text, ids and (with logprobs) their scores."""

    text: str
    ids: list[int]
    logprobs: dict | None = None  # the legacy logprobs object of the prompt tokens


async def score_echo(s: ServerState, echo: list[Echo], top_n: int, adapter: str | None) -> None:
    """Score the prompts' tokens with kogpt eval's scoring (off the event loop), through `adapter`'s layers if
    one is named; the first token has none."""
    ids = None if adapter is None else torch.tensor(s.gpt.adapter_index(adapter))

    def score():
        with routed(ids):
            return prompt_scores(s.gpt.model, [e.ids for e in echo], top_n)

    scores = await asyncio.to_thread(score)
    for e, sc in zip(echo, scores):
        e.logprobs = s.token_text.completion(e.ids, [None, *sc.logprobs], [None, *sc.top], 0, top_n)


def join_logprobs(a: dict | None, b: dict | None) -> dict | None:
    """The legacy logprobs of a prompt (`a`) followed by those of its continuation (`b`)."""
    if a is None or b is None:
        return a or b
    top = None if a["top_logprobs"] is None else a["top_logprobs"] + b["top_logprobs"]
    return {k: a[k] + b[k] for k in ("tokens", "token_logprobs", "text_offset")} | {"top_logprobs": top}


class Finished:
    """The job of a request with max_tokens 0: every choice ends at once, nothing generated."""

    def __init__(self, specs: list[SeqSpec]):
        self.n, self.prompt_tokens = len(specs), sum(len(spec.ids) for spec in specs)

    def cancel(self) -> None:
        pass

    async def __aiter__(self):
        for i in range(self.n):
            yield Piece(i, "", finish="length")


# -- request → sequences --------------------------------------------------------------------------
def plan(s: ServerState, body, model: str, prompts: list[list[int]], stops: list[str], max_tokens: int | None,
         logprobs: int | None, prompt_param: str) -> list[SeqSpec]:
    """One SeqSpec per prompt and choice for served model `model`, or the APIError (400) naming the first
    option out of bounds."""
    gpt, ctx, limit = s.gpt, s.ctx, s.limit
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
    for ids in prompts:
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
            hooks = ([] if steer is None else [steer[len(specs)]]) + adapter_hooks(s, model, steer is not None)
            specs.append(SeqSpec(ids, budget, sampling, stops, seed, logprobs, tuple(hooks),
                                 gpt.speculate if body.speculate is None else body.speculate))
    return specs


def adapter_hooks(s: ServerState, model: str, steered: bool) -> list:
    """The hooks that run a sequence with served model `model`'s adapter, or the 400 for what cannot."""
    try:
        return s.gpt.adapter_hooks(s.adapter(model), steered)
    except UserError as e:
        raise APIError(400, str(e), "bow") from None


def submit(s: ServerState, specs: list[SeqSpec]) -> Job:
    try:
        return s.scheduler.submit(specs)
    except QueueFull as e:
        raise APIError(429, str(e), code="rate_limit_exceeded", type="rate_limit_error") from None


# -- sequences → response -------------------------------------------------------------------------
async def respond(s: ServerState, request: Request, body, model: str, job: Job | Finished, specs: list[SeqSpec],
                  kind: str, echo: list[Echo] | None = None):
    """The whole response (of served model `model`) as one JSON body, or (body.stream) the SSE stream of its
    pieces."""
    rid, created = new_id("cmpl" if kind == "text_completion" else "chatcmpl"), int(time.time())
    chat = kind == "chat.completion"
    top_n = specs[0].logprobs
    want_lp = top_n is not None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _SSE(job, sse(s, model, job, rid, created, chat, echo, top_n, include_usage))
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
            lp = s.token_text.chat(tokens[i], lps[i], tops[i]) if want_lp else None
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                            "finish_reason": finish[i]})
        else:
            prompt = echo[i].text if echo else ""
            lp = s.token_text.completion(tokens[i], lps[i], tops[i], len(prompt), top_n) if want_lp else None
            lp = join_logprobs(echo[i].logprobs, lp) if echo else lp
            choices.append({"index": i, "text": prompt + text, "logprobs": lp, "finish_reason": finish[i]})
    out = envelope(kind, rid, model, choices, created)
    out["usage"] = usage(job.prompt_tokens, completion_tokens)
    return out


async def sse(s: ServerState, model: str, job: Job | Finished, rid: str, created: int, chat: bool,
              echo: list[Echo] | None, top_n: int | None, include_usage: bool):
    """The SSE chunks of a job; an engine failure mid-stream becomes an error chunk, as OpenAI does.

    With echo, a choice's first chunk carries its prompt (and the prompt's logprobs) before its first
    new text, as vLLM streams it; with max_tokens 0 that chunk holds the prompt alone.
    """
    kind = "chat.completion.chunk" if chat else "text_completion"
    started: set[int] = set()
    offsets = [len(e.text) for e in echo] if echo else [0] * job.n
    completion_tokens = 0

    def chunk(choices: list[dict], **extra) -> bytes:
        data = dict(envelope(kind, rid, model, choices, created), **extra)
        return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"

    try:
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(job.n)])
        async for p in job:
            text = p.text
            if chat and p.index not in started:
                text = text.lstrip()
                if text:
                    started.add(p.index)
            completion_tokens += p.completion_tokens
            prompt = echo[p.index] if echo and p.index not in started else None
            if prompt:
                started.add(p.index)
            if not text and not p.finish and not prompt:
                continue
            finish = None if p.finish == "cancelled" else p.finish
            if chat:
                lp = s.token_text.chat(p.token_ids, p.logprobs, p.top) if top_n is not None else None
                choice = {"index": p.index, "delta": {"content": text} if text else {}, "logprobs": lp}
            else:
                lp = None
                if top_n is not None:
                    lp = s.token_text.completion(p.token_ids, p.logprobs, p.top, offsets[p.index], top_n)
                    offsets[p.index] += len(text)
                if prompt:
                    text, lp = prompt.text + text, join_logprobs(prompt.logprobs, lp)
                choice = {"index": p.index, "text": text, "logprobs": lp}
            yield chunk([dict(choice, finish_reason=finish)])
        if include_usage:
            yield chunk([], usage=usage(job.prompt_tokens, completion_tokens))
    except Exception as e:  # the engine failed mid-stream: say so in the stream, as OpenAI does
        log.exception("stream failed")
        err = APIError(500, f"generation failed: {e}", type="server_error")
        yield b"data: " + json.dumps(err.body()).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


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
