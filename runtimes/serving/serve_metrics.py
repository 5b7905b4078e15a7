"""Prometheus metrics for `bitdeploy serve` (GET /metrics). One registry per server, so tests can run several."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "bitdeploy_requests", "HTTP requests answered, by route and status code", ["route", "code"], registry=r
        )
        self.errors = Counter(
            "bitdeploy_request_errors",
            "HTTP requests answered with a 4xx or 5xx status, by route and code",
            ["route", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "bitdeploy_request_duration_seconds",
            "Time from request to answer, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram("bitdeploy_batch_size", "Images per engine call", buckets=BATCH_BUCKETS, registry=r)
        self.infer_time = Histogram(
            "bitdeploy_inference_duration_seconds", "Time of one engine call", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("bitdeploy_queue_depth", "Images waiting for the engine", registry=r)
        self.images = Counter("bitdeploy_images", "Images inferred", registry=r)
        Gauge("bitdeploy_model_info", "The served model", ["model"], registry=r).labels(model).set(1)

    def observe_request(self, route: str, code: int | str, seconds: float, error: bool | None = None) -> None:
        """`code`: an HTTP status, or a gRPC status name (then say whether it is an `error`)."""
        self.requests.labels(route, str(code)).inc()
        if error if error is not None else int(code) >= 400:
            self.errors.labels(route, str(code)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_batch(self, rows: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.infer_time.observe(seconds)
        self.images.inc(rows)

    def set_queue_depth(self, rows: int) -> None:
        self.queue_depth.set(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)


ROUTE_KEY = "bitdeploy.route"  # where a route handler records its template, for the labels


class MetricsMiddleware:
    """Counts every answer (including the router's 404/405) by route template and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = str(
                scope.get(ROUTE_KEY) or getattr(scope.get("route"), "path", "other")
            )  # 405s carry the router's match
            self.metrics.observe_request(route, status, time.perf_counter() - t0)
