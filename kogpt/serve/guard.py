"""The pure-ASGI middleware in front of every route: bearer-key check, body size limit, request counting.

It runs before FastAPI parses anything, so a wrong key (401) or an oversized body (413) never reaches
a handler; a body it lets through is declared JSON to FastAPI, as every body of this API is (curl -d
sends a form type). Every response is counted in kogpt_http_requests_total by route and status. Paths
outside the known routes count as "other", so a scanner cannot grow the metric without bound.

    app.add_middleware(Guard, metrics=metrics, api_key="s3cret", max_body=1 << 20)
"""

from __future__ import annotations

import hmac

from .protocol import APIError
from .telemetry import Metrics

ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


def route_label(path: str) -> str:
    """The `path` label of a request: its route, or "other"."""
    if path.startswith("/v1/models/"):
        return "/v1/models"
    return path if path in ROUTES else "other"


class Guard:
    """Pure ASGI middleware: bearer-key check, request body size limit, request counting."""

    def __init__(self, app, metrics: Metrics, api_key: str | None, max_body: int):
        self.app, self.metrics, self.max_body = app, metrics, max_body
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = route_label(scope["path"])

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
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
            # every body of this API is JSON, whatever the client declared (curl -d says form-urlencoded)
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = dict(scope, headers=[*headers, (b"content-type", b"application/json")])
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
    """A receive channel that hands out the already-read body once, then the client's messages."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
