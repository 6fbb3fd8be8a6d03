"""Prometheus metrics of one server (its own ``CollectorRegistry``, so several apps can live in
one process): requests and errors by endpoint and status, latency, batch sizes and seconds, queue depth and
adapters loaded; ``GET /metrics`` renders them."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """The server's metrics."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("adapterkit_requests", "HTTP requests answered", ["endpoint", "status"],
                                registry=self.registry)
        self.errors = Counter("adapterkit_request_errors", "HTTP requests answered with a 4xx or 5xx status",
                              ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("adapterkit_request_latency_seconds", "Time to answer a request", ["endpoint"],
                                 registry=self.registry)
        self.batch_size = Histogram("adapterkit_batch_size", "Examples per forward pass", ["kind"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.batch_seconds = Histogram("adapterkit_batch_seconds", "Seconds of model work per batch", ["kind"],
                                       registry=self.registry)
        self.queue_depth = Gauge("adapterkit_queue_depth", "Requests waiting for a batch", registry=self.registry)
        self.adapters_loaded = Gauge("adapterkit_adapters_loaded", "Adapters that requests may use",
                                     registry=self.registry)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
