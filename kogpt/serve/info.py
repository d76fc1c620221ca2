"""The routes that describe the server: the playground page (GET /), GET /health, GET /metrics and
GET /v1/models (the model card: context, limits, sampling defaults, chat template).

/health is 503 once the engine thread has died, so a load balancer stops sending traffic;
/metrics is the Prometheus exposition of kogpt.serve.telemetry.

    app.include_router(info.router)
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response

from .schema import Health, ModelCard, ModelList, errors, responses
from .state import ServerState, server

STATIC = Path(__file__).parent / "static"
router = APIRouter()


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")


@router.get("/health", responses=responses(Health, 503))
async def health(request: Request):
    s = server(request)
    alive = s.scheduler.alive
    body = {"status": "ok" if alive else "error", "model": s.model_id, "running": s.scheduler.running,
            "waiting": s.scheduler.waiting, "max_batch_size": s.max_batch_size, "max_queue": s.max_queue}
    return JSONResponse(body, 200 if alive else 503)


@router.get("/metrics", response_class=PlainTextResponse, responses=errors(401))
async def prometheus(request: Request):
    body, content_type = server(request).metrics.exposition(request.headers.get("accept"))
    return Response(body, media_type=content_type)


@router.get("/v1/models", responses=responses(ModelList, 401))
async def models(request: Request):
    s = server(request)
    return {"object": "list", "data": [model_card(s, m) for m in s.models()]}


@router.get("/v1/models/{name:path}", responses=responses(ModelCard, 401, 404))
async def model(name: str, request: Request):
    s = server(request)
    return model_card(s, s.pick(name))


def model_card(s: ServerState, model: str) -> dict:
    sampling = s.gpt.defaults.sampling
    adapter = s.adapter(model)
    note = ("base model without a chat template of its own: /v1/chat/completions renders messages with this template"
            if adapter is None else "adapter: /v1/chat/completions renders messages with this template")
    return {"id": model, "object": "model", "created": 0, "owned_by": "kogpt",
            "parent": None if adapter is None else s.model_id, "chat_default": model == s.chat_model,
            "max_model_len": s.ctx, "max_tokens_limit": s.limit,
            "defaults": {"temperature": sampling.temperature if sampling.do_sample else 0.0, "top_p": sampling.top_p,
                         "top_k": sampling.top_k, "repetition_penalty": sampling.repetition_penalty},
            "chat_template": dict(s.template.describe(), note=note)}
