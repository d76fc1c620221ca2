"""`kogpt serve`: an OpenAI-compatible HTTP server with continuous batching and a web playground.

app.py builds the FastAPI app (create_app); completions.py holds the generation routes, info.py the
page, /health, /metrics and /v1/models, guard.py the key/size/counting middleware, state.py what
they share; scheduler.py runs the engine thread, protocol.py the OpenAI wire format, schema.py the
response models of /openapi.json, telemetry.py the Prometheus metrics (prometheus_client), static/
the page. The chat template lives in kogpt.text.chat.

    from kogpt.serve import serve; serve(KoGPT.from_pretrained("kogpt-mini"), port=8000)
"""

from __future__ import annotations

from .app import create_app
from ..text.chat import ChatTemplate

__all__ = ["create_app", "serve", "ChatTemplate"]


def serve(gpt, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **options) -> None:
    """Run the server until interrupted; `options` are create_app's keyword arguments."""
    import uvicorn

    app = create_app(gpt, **options)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
