"""What every route of one server shares: the model, its scheduler and metrics, chat template and limits.

create_app builds one ServerState and keeps it on `app.state.server`; a handler reads it from its
request, so handlers are plain module functions (no closures) and each route module stands alone.

    state = server(request); job = state.scheduler.submit(specs)
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from ..api import KoGPT
from ..text.chat import ChatTemplate
from .protocol import TokenText
from .scheduler import Scheduler
from .telemetry import Metrics


@dataclass(frozen=True)
class ServerState:
    """One server's model, engine thread, metrics and request limits, fixed when the app is built."""

    gpt: KoGPT
    scheduler: Scheduler
    metrics: Metrics
    template: ChatTemplate
    token_text: TokenText
    model_id: str  # the name responses carry
    ctx: int  # the model's context, in tokens
    limit: int  # the largest max_tokens a request may ask for
    max_batch_size: int
    max_queue: int


def server(request: Request) -> ServerState:
    """The state of the app that received `request`."""
    return request.app.state.server
