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
from .protocol import APIError, TokenText
from .scheduler import Scheduler
from .telemetry import Metrics


@dataclass(frozen=True)
class ServerState:
    """One server's model (and the adapters it serves beside it), engine thread, metrics and request limits,
    fixed when the app is built."""

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
    chat_model: str  # the model /v1/chat/completions uses when a request names none (the base or an adapter)

    def pick(self, model: str | None, chat: bool = False) -> str:
        """The served model a request's `model` names: the base's id or an adapter's name; none named: the base,
        or for chat the chat model. Unknown: 404 in OpenAI's error shape."""
        if model is None:
            return self.chat_model if chat else self.model_id
        if model != self.model_id and model not in self.gpt.adapters:
            served = ", ".join(repr(m) for m in self.models())
            raise APIError(404, f"model {model!r} not found; this server serves {served}", "model",
                           "model_not_found", type="not_found_error")
        return model

    def models(self) -> list[str]:
        """The ids this server answers to: the base model's, then each adapter's."""
        return [self.model_id, *self.gpt.adapters]

    def adapter(self, model: str) -> str | None:
        """The adapter name of served model id `model` (None: the base)."""
        return None if model == self.model_id else model


def server(request: Request) -> ServerState:
    """The state of the app that received `request`."""
    return request.app.state.server
