"""`kogpt serve`: an OpenAI-compatible HTTP server with continuous batching and a web playground.

app.py holds the routes (FastAPI), scheduler.py the background engine thread, protocol.py the
OpenAI wire format, chat.py the chat template, metrics.py the Prometheus metrics, static/ the page.

    from kogpt.serve import serve; serve(KoGPT.from_pretrained("kogpt-mini"), port=8000)
"""

from __future__ import annotations

from .app import create_app
from .chat import ChatTemplate

__all__ = ["create_app", "serve", "ChatTemplate"]


def serve(gpt, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **options) -> None:
    """Run the server until interrupted; `options` are create_app's keyword arguments."""
    import uvicorn

    app = create_app(gpt, **options)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
