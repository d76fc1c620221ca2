"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

Counters, gauges and histograms are updated from the event loop and the engine thread alike, so
every update takes one lock. `Metrics.render()` is the body of GET /metrics; gauges that mirror live
state (queue depth, running rows) are read through callbacks at render time.

    m = Metrics(); m.ttft.observe(0.12); print(m.render())
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Iterable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)] + ([extra] if extra else [])
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Counter:
    """A monotonically increasing count, optionally split by labels."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (), lock: threading.Lock | None = None):
        self.name, self.help, self.label_names = name, help, labels
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}
        self.lock = lock or threading.Lock()

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self.lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def samples(self) -> Iterable[str]:
        with self.lock:
            values = sorted(self.values.items())
        for labels, v in values:
            yield f"{self.name}{_labels(self.label_names, labels)} {_num(v)}"


class Gauge:
    """A value read from a callback when the metrics are rendered."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def samples(self) -> Iterable[str]:
        yield f"{self.name} {_num(self.read())}"


class Histogram:
    """Counts of observations per upper bound (cumulative, as Prometheus expects), plus sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...], lock: threading.Lock | None = None):
        self.name, self.help, self.buckets = name, help, tuple(buckets) + (math.inf,)
        self.counts = [0] * len(self.buckets)
        self.sum, self.count = 0.0, 0
        self.lock = lock or threading.Lock()

    def observe(self, value: float) -> None:
        with self.lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[i] += 1
                    break
            self.sum += value
            self.count += 1

    def samples(self) -> Iterable[str]:
        with self.lock:
            counts, total, n = list(self.counts), self.sum, self.count
        running = 0
        for bound, c in zip(self.buckets, counts):
            running += c
            yield f'{self.name}_bucket{{le="{_num(bound)}"}} {running}'
        yield f"{self.name}_sum {_num(total)}"
        yield f"{self.name}_count {n}"


class Metrics:
    """Every metric the server exports; see the README's /metrics section for their meaning."""

    def __init__(self):
        lock = threading.Lock()
        self.requests = Counter("kogpt_http_requests_total", "HTTP requests by path and status code",
                                ("path", "status"), lock)
        self.prompt_tokens = Counter("kogpt_prompt_tokens_total", "Prompt tokens of accepted requests", lock=lock)
        self.generation_tokens = Counter("kogpt_generation_tokens_total", "Tokens generated", lock=lock)
        self.cancelled = Counter("kogpt_sequences_cancelled_total",
                                 "Sequences dropped before they finished (client disconnects)", lock=lock)
        self.ttft = Histogram("kogpt_time_to_first_token_seconds", "Time from request to first generated token",
                              LATENCY_BUCKETS, lock)
        self.latency = Histogram("kogpt_request_latency_seconds", "Time from request to its last generated token",
                                 LATENCY_BUCKETS, lock)
        self.batch_size = Histogram("kogpt_batch_size", "Sequences decoded together per engine step",
                                    BATCH_BUCKETS, lock)
        self.gauges: list[Gauge] = []

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        """Export a live value (read at render time)."""
        self.gauges.append(Gauge(name, help, read))

    def render(self) -> str:
        """The Prometheus text format of every metric."""
        out = []
        for m in (self.requests, self.prompt_tokens, self.generation_tokens, self.cancelled, self.ttft,
                  self.latency, self.batch_size, *self.gauges):
            out += [f"# HELP {m.name} {m.help}", f"# TYPE {m.name} {m.kind}", *m.samples()]
        return "\n".join(out) + "\n"
