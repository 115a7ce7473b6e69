"""A worker's /metrics (fleet_* and vLLM's vllm:*) and the engine figures of `fleet engines`.

Engine a1 of the session runs with FLEET_METRICS_PORT=0 (vLLM's stat logging on), b1 without
(the scheduler's counts read after each step): both ways of counting are exercised.
"""

from __future__ import annotations

import re
import threading
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from producer import generate
from producer.client import generate_batch
from producer.errors import PromptTooLong
from tests.harness import WorkerProc, engine_info, wait_until
from tests.test_compose import dashboard_metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample of a /metrics page, by (name, labels)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


@pytest.mark.engine
def test_worker_metrics_move_with_the_work_and_agree_with_fleet_engines(
    workers_ab: tuple[WorkerProc, WorkerProc], app: Any
) -> None:
    a1 = workers_ab[0]
    info = engine_info(app, a1.node)
    url = info["metrics_url"]
    assert url and url.startswith("http://127.0.0.1:")
    before = scrape(url)
    fleet_labels = {"model": "tiny", "engine": "a1"}
    vllm_labels = {"model_name": "tiny", "engine": "a1"}
    assert value(before, "fleet_engine_state", state="ready", **fleet_labels) == 1

    # 1,200 requests in 3 many-request tasks: more than the engine runs at once (1,024), so
    # some wait in the engine while the rest run.
    seen: list[tuple[int, int, float, float]] = []
    results: list[Any] = []
    batch = threading.Thread(target=lambda: results.extend(generate_batch(
        [f"count {i}" for i in range(1200)], model="tiny", max_tokens=24, ignore_eos=True,
        chunk_size=400, timeout=300)))
    batch.start()

    def both_seen() -> bool:
        now = engine_info(app, a1.node)
        samples = scrape(url)
        seen.append((now["running"], now["waiting"],
                     value(samples, "vllm:num_requests_running", **vllm_labels),
                     value(samples, "vllm:num_requests_waiting", **vllm_labels)))
        return any(r > 0 and w > 0 for r, w, _, _ in seen) and any(
            r > 0 for _, _, r, _ in seen)

    wait_until(both_seen, 240, f"running and waiting requests in a1's figures: {seen}",
               interval=0.2)
    batch.join(300)
    assert len(results) == 1200
    assert max(r for r, _, _, _ in seen) <= 1024
    with pytest.raises(PromptTooLong):
        generate.delay("word " * 600, model="tiny").get(timeout=60)

    after_info = engine_info(app, a1.node)
    after = scrape(url)
    # Nothing runs or waits once every request ended.
    assert (after_info["running"], after_info["waiting"]) == (0, 0)
    assert value(after, "vllm:num_requests_running", **vllm_labels) == 0

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("fleet_tasks_received_total", **fleet_labels) == 4
    assert delta("fleet_tasks_succeeded_total", **fleet_labels) == 3
    assert delta("fleet_tasks_failed_total", error="PromptTooLong", **fleet_labels) == 1
    assert after_info["tasks_failed"] - info["tasks_failed"] == 1
    assert delta("fleet_task_queue_seconds_count", **fleet_labels) == 4
    assert delta("fleet_task_engine_seconds_count", **fleet_labels) == 4
    assert delta("fleet_task_engine_seconds_sum", **fleet_labels) > 0
    # vLLM's own figures count requests, and agree with what `fleet engines` reports.
    assert delta("vllm:e2e_request_latency_seconds_count", **vllm_labels) == 1200
    assert delta("vllm:time_to_first_token_seconds_count", **vllm_labels) == 1200
    assert delta("vllm:generation_tokens_total", **vllm_labels) == 1200 * 24
    assert (after_info["tokens_generated"] - info["tokens_generated"]
            == delta("vllm:generation_tokens_total", **vllm_labels))
    assert (after_info["requests_served"] - info["requests_served"]
            == delta("vllm:request_success_total", **vllm_labels))
    assert value(after, "fleet_queue_depth", model="tiny") == 0
    # Every worker metric the compose Grafana dashboard reads is one a worker exports.
    exported = {re.sub(r"_(bucket|count|sum|total)$", "", name) for name, _ in after}
    wanted = {re.sub(r"_total$", "", name) for name in dashboard_metrics()["fleet-workers"]}
    assert wanted <= exported, wanted - exported


@pytest.mark.engine
def test_engine_figures_without_metrics_come_from_the_scheduler(
    workers_ab: tuple[WorkerProc, WorkerProc], app: Any
) -> None:
    b1 = workers_ab[1]
    assert engine_info(app, b1.node)["metrics_url"] is None
    seen: list[tuple[int, int]] = []
    done: list[Any] = []
    batch = threading.Thread(target=lambda: done.extend(generate_batch(
        [f"count {i}" for i in range(600)], model="tiny-b", max_tokens=16, ignore_eos=True,
        chunk_size=600, timeout=300)))
    batch.start()

    def waiting_seen() -> bool:
        now = engine_info(app, b1.node)
        seen.append((now["running"], now["waiting"]))
        return any(r > 0 and w > 0 for r, w in seen)

    # tiny-b runs at most 256 at once: the other 344 wait inside the engine.
    wait_until(waiting_seen, 240, f"running and waiting requests in b1's figures: {seen}",
               interval=0.1)
    batch.join(300)
    assert len(done) == 600
    assert max(r for r, _ in seen) <= 256
    after = engine_info(app, b1.node)
    assert (after["running"], after["waiting"]) == (0, 0)


def test_metrics_count_outcomes_by_class() -> None:
    from workers.metrics import WorkerMetrics

    class FakeRuntime:
        model_id, engine_id, state, in_flight = "m", "e1", "ready", 0

    registry = CollectorRegistry()
    metrics = WorkerMetrics(FakeRuntime(), lambda: 7, registry=registry)  # type: ignore[arg-type]
    metrics.taken([None, 1.0])
    metrics.finished([("SUCCESS", None, 0.5), ("FAILURE", "PromptTooLong", 0.1),
                      ("FAILURE", "DeadLettered", None), ("REVOKED", None, None)])
    labels = {"model": "m", "engine": "e1"}

    def get(name: str, **extra: str) -> float | None:
        return registry.get_sample_value(name, {**labels, **extra})

    assert get("fleet_tasks_received_total") == 2
    assert get("fleet_task_queue_seconds_count") == 1  # a send time only on one
    assert get("fleet_tasks_succeeded_total") == 1
    assert get("fleet_tasks_revoked_total") == 1
    assert get("fleet_tasks_failed_total", error="PromptTooLong") == 1
    assert get("fleet_tasks_failed_total", error="DeadLettered") == 1
    assert get("fleet_tasks_dead_lettered_total") == 1
    assert get("fleet_task_engine_seconds_count") == 2
    assert registry.get_sample_value("fleet_queue_depth", {"model": "m"}) == 7
    assert get("fleet_engine_state", state="ready") == 1
    assert get("fleet_engine_state", state="loading") == 0
