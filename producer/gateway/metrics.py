"""The gateway's Prometheus metrics, under vLLM's own names where the two measure the same thing
(latency, time to first token, tokens), so dashboards built for vLLM's server read the gateway.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

#: vLLM's buckets for request latency (seconds) and time to first token.
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


class Metrics:
    """One registry per gateway (not the process-wide default: tests start several)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("fleet_gateway_requests", "HTTP requests answered, by status",
                                ["endpoint", "model", "status"], registry=r)
        self.in_flight_now = Gauge("fleet_gateway_requests_in_flight",
                                   "Requests the gateway is answering now", ["model"],
                                   registry=r)
        self.latency = Histogram("vllm:e2e_request_latency_seconds",
                                 "Seconds from a request's arrival to its last token",
                                 ["model_name"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds",
                              "Seconds from a streamed request's arrival to its first text",
                              ["model_name"], buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of answered requests",
                                     ["model_name"], registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens",
                                         "Tokens generated for answered requests",
                                         ["model_name"], registry=r)

    @contextmanager
    def in_flight(self, model: str) -> Iterator[None]:
        gauge = self.in_flight_now.labels(model)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def finished(self, endpoint: str, model: str, status: int) -> None:
        self.requests.labels(endpoint, model, str(status)).inc()

    def completed(self, endpoint: str, model: str, done: list[Any], seconds: float) -> None:
        """A request answered with these completions."""
        self.finished(endpoint, model, 200)
        self.latency.labels(model).observe(seconds)
        self.prompt_tokens.labels(model).inc(sum(c.prompt_tokens for c in done))
        self.generation_tokens.labels(model).inc(sum(c.completion_tokens for c in done))

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
