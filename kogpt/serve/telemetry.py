"""The server's Prometheus metrics, kept by prometheus_client in a registry of their own.

Each app gets its own CollectorRegistry, so several servers in one process (the tests start many)
never collide in prometheus_client's global one. Gauges that mirror live state (queue depth, running
rows) are read through callbacks at scrape time. `exposition()` answers GET /metrics in the format
the scraper's Accept header asks for, as prometheus_client's own exporters do (plain text 0.0.4 by
default, OpenMetrics for a Prometheus server that prefers it).

    m = Metrics(); m.ttft.observe(0.12); body, content_type = m.exposition("*/*")
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _Registry(CollectorRegistry):
    """A registry without the `_created` series: creation times add a gauge family per counter and
    histogram to the text format and tell an operator nothing here (process start is one series)."""

    def collect(self):
        for family in super().collect():
            family.samples = [s for s in family.samples if s.name != family.name + "_created"]
            yield family


class Metrics:
    """Every metric the server exports; docs/serving.md (Metrics) says what each means."""

    def __init__(self):
        self.registry = r = _Registry()
        self.requests = Counter("kogpt_http_requests_total", "HTTP requests by path and status code",
                                ("path", "status"), registry=r)
        self.prompt_tokens = Counter("kogpt_prompt_tokens_total", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("kogpt_generation_tokens_total", "Tokens generated", registry=r)
        self.cancelled = Counter("kogpt_sequences_cancelled_total",
                                 "Sequences dropped before they finished (client disconnects)", registry=r)
        self.ttft = Histogram("kogpt_time_to_first_token_seconds", "Time from request to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("kogpt_request_latency_seconds", "Time from request to its last generated token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("kogpt_batch_size", "Sequences decoded together per engine step",
                                    buckets=BATCH_BUCKETS, registry=r)

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        """Export a live value (read at scrape time)."""
        Gauge(name, help, registry=self.registry).set_function(read)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """(body, content type) of GET /metrics for a request's Accept header."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type
