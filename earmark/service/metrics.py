"""Prometheus metrics: requests and latencies per endpoint (the route template, so label names in paths
cannot grow the series), plus the model's labels, clip counts and version. One registry per app."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _ModelCollector:
    """Reads the live model at scrape time (no bookkeeping to go stale)."""

    def __init__(self, snapshot: Callable[[], dict | None]) -> None:
        self.snapshot = snapshot

    def collect(self):
        snap = self.snapshot() or {}
        ready = GaugeMetricFamily("earmark_model_ready", "1 once the model is loaded")
        ready.add_metric([], 1.0 if snap else 0.0)
        yield ready
        if not snap:
            return
        gen = GaugeMetricFamily("earmark_model_version", "model version: changes applied since it was created")
        gen.add_metric([], float(snap.get("version", 0)))
        yield gen
        labels = GaugeMetricFamily("earmark_model_labels", "number of labels the model knows")
        labels.add_metric([], float(len(snap.get("counts", {}))))
        yield labels
        clips = GaugeMetricFamily("earmark_label_clips", "clips learned per label", labels=["label"])
        for name, n in sorted(snap.get("counts", {}).items()):
            clips.add_metric([name], float(n))
        yield clips


class Metrics:
    def __init__(self, snapshot: Callable[[], dict | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("earmark_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("earmark_request_seconds", "request latency by endpoint (first byte in to "
                                 "last byte out)", ["endpoint", "method"], buckets=BUCKETS, registry=self.registry)
        self.in_flight = Gauge("earmark_requests_in_flight", "requests being handled", registry=self.registry)
        self.learn_queue = Gauge("earmark_learn_queue", "learn/forget requests admitted and not yet answered",
                                 registry=self.registry)
        self.rejected = Counter("earmark_rejected", "requests refused for a full queue", ["queue"],
                                registry=self.registry)
        self.registry.register(_ModelCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware overhead): counts every HTTP request once it has been answered."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(endpoint, method, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint, method).observe(time.perf_counter() - start)
