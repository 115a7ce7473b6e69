"""A worker's Prometheus metrics, on its own ``/metrics`` port (off unless FLEET_METRICS_PORT).

Two families share the port:

- vLLM's own (``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
  ``vllm:kv_cache_usage_perc``, ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``,
  ``vllm:time_to_first_token_seconds``, ``vllm:e2e_request_latency_seconds``, ...), recorded by
  vLLM's stat logging exactly as vLLM's server exports them, so dashboards built for vLLM work.
  Their ``engine`` label, vLLM's engine index, is rewritten to the fleet engine id.
- the fleet's (``fleet_*``, labels ``model`` and ``engine``): tasks received, succeeded, failed
  by error class, revoked, redelivered, dead-lettered; time waiting in the queue and time in
  the engine; the engine's state; the depth of its model's queue.

The counters are bound to their labels once, so a task costs a few increments and two
histogram observations; the state and the queue depth are read only when Prometheus scrapes.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from workers.runtime import EngineState, Runtime

log = logging.getLogger(__name__)

#: Seconds, from a millisecond (a task taken at once) to half an hour (a long backlog).
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
#: Seconds in the engine; vLLM's buckets for ``vllm:e2e_request_latency_seconds``, and below.
ENGINE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0,
                  20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

LABELS = ("model", "engine")


class WorkerMetrics:
    """The fleet's metrics of one worker, bound to its model and engine id."""

    def __init__(self, runtime: Runtime, queue_depth: Callable[[], int],
                 registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.engine_id = runtime.engine_id
        labels = {"model": runtime.model_id, "engine": runtime.engine_id}

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, LABELS, registry=registry).labels(**labels)

        self.received = counter("fleet_tasks_received", "Serving tasks taken from the queue.")
        self.succeeded = counter("fleet_tasks_succeeded", "Tasks that ended with a result.")
        self.revoked = counter("fleet_tasks_revoked", "Tasks revoked or expired.")
        self.redelivered = counter("fleet_tasks_redelivered",
                                   "Tasks taken again after their worker was lost.")
        self.dead_lettered = counter("fleet_tasks_dead_lettered",
                                     "Tasks moved to the dead-letter list after too many "
                                     "deliveries.")
        self._failed = Counter("fleet_tasks_failed", "Tasks that ended with an error, by class.",
                               (*LABELS, "error"), registry=registry)
        self._failed_by: dict[str, Any] = {}
        self._labels = labels
        self.queue_seconds = Histogram(
            "fleet_task_queue_seconds", "Seconds from a task's send to its worker taking it.",
            LABELS, buckets=WAIT_BUCKETS, registry=registry).labels(**labels)
        self.engine_seconds = Histogram(
            "fleet_task_engine_seconds", "Seconds from a task's hand-over to the engine to its "
            "end.", LABELS, buckets=ENGINE_BUCKETS, registry=registry).labels(**labels)
        registry.register(_EngineCollector(runtime, queue_depth))

    def failed(self, error: str, count: int = 1) -> None:
        child = self._failed_by.get(error)
        if child is None:
            child = self._failed_by[error] = self._failed.labels(**self._labels, error=error)
        child.inc(count)

    def finished(self, outcomes: Iterable[tuple[str, str | None, float | None]]) -> None:
        """Count ended tasks: (state, error class or None, seconds since hand-over or None)."""
        states: Tally[tuple[str, str | None]] = Tally()
        for state, error, seconds in outcomes:
            states[(state, error)] += 1
            if seconds is not None:
                self.engine_seconds.observe(seconds)
        for (state, error), count in states.items():
            if state == "SUCCESS":
                self.succeeded.inc(count)
            elif state == "REVOKED":
                self.revoked.inc(count)
            else:
                self.failed(error or "Exception", count)
                if error == "DeadLettered":
                    self.dead_lettered.inc(count)

    def taken(self, sent_at: Iterable[float | None]) -> None:
        """Count tasks taken from the queue, with the send times their producers wrote."""
        now = time.time()
        count = 0
        for sent in sent_at:
            count += 1
            if sent is not None:
                self.queue_seconds.observe(max(0.0, now - sent))
        self.received.inc(count)

    def serve(self, address: str, port: int) -> str:
        """Serve ``/metrics`` on ``address:port`` (0: a free port); return its URL."""
        served = CollectorRegistry(auto_describe=True)
        served.register(_EngineLabel(self.registry, self.engine_id))
        server, _ = start_http_server(port, addr=address, registry=served)
        bound = server.server_address[1]
        host = socket.gethostname() if address in ("0.0.0.0", "::", "") else address
        url = f"http://{host}:{bound}/metrics"
        log.info("metrics on %s", url)
        return url


class _EngineCollector(Collector):
    """The engine's state and its model's queue depth, read at each scrape."""

    def __init__(self, runtime: Runtime, queue_depth: Callable[[], int]) -> None:
        self.runtime = runtime
        self.queue_depth = queue_depth

    def collect(self) -> Iterator[Metric]:
        runtime = self.runtime
        labels = [runtime.model_id, runtime.engine_id]
        state = GaugeMetricFamily("fleet_engine_state", "1 for the engine's current state.",
                                  labels=[*LABELS, "state"])
        for each in EngineState:
            state.add_metric([*labels, each.value], 1.0 if runtime.state == each else 0.0)
        yield state
        held = GaugeMetricFamily("fleet_engine_in_flight",
                                 "Tasks' requests the worker holds (taken, not yet ended).",
                                 labels=list(LABELS))
        held.add_metric(labels, runtime.in_flight)
        yield held
        try:
            depth = self.queue_depth()
        except Exception:  # Redis away: no figure rather than a failed scrape
            log.debug("queue depth unavailable", exc_info=True)
            return
        queue = GaugeMetricFamily("fleet_queue_depth", "Tasks waiting in the model's queue.",
                                  labels=["model"])
        queue.add_metric([runtime.model_id], depth)
        yield queue


class _EngineLabel(Collector):
    """Every metric of ``registry``, vLLM's ``engine`` label (its engine index) replaced by
    the fleet engine id, so that each series names the engine it came from."""

    def __init__(self, registry: CollectorRegistry, engine_id: str) -> None:
        self.registry = registry
        self.engine_id = engine_id

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            if metric.name.startswith("vllm:"):
                metric.samples = [
                    s._replace(labels={**s.labels, "engine": self.engine_id})
                    if "engine" in s.labels else s for s in metric.samples]
            yield metric
