"""Priorities with real workers and the real engine: an interactive task sent after a bulk job
overtakes it in the Redis queue, in the worker's room and in vLLM's scheduler, and a priority
survives a worker killed while holding its task.

One worker of ``tiny-prio`` (max_num_seqs 256, the engine probe loaded) serves the bulk job; the
test session's workers take 64 tasks each (FLEET_WORKER_CONCURRENCY), so most of the job waits
in Redis while the worker holds the rest.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from producer.engines import list_engines, queue_levels
from producer.tasks import generate
from tests.conftest import VISIBILITY_TIMEOUT
from tests.harness import Fleet, WorkerProc, engine_probe, result_of, wait_until

pytestmark = pytest.mark.engine

MODEL = "tiny-prio"
#: Tasks of the bulk job: at about 400 requests/s of 32 tokens, several seconds of work.
BULK = 2_000
SAMPLING = {"max_tokens": 32, "ignore_eos": True, "temperature": 0.0}


@pytest.fixture(scope="module")
def worker(fleet: Fleet, app: Any) -> WorkerProc:
    w = fleet.start(MODEL, "p1", include="tests.engine_probe")
    fleet.wait_ready(app, w)
    return w


def test_interactive_task_overtakes_a_queued_bulk_job(worker: WorkerProc, app: Any,
                                                      redis_client: Any) -> None:
    engine_probe(app, worker.node, reset=True)
    bulk = [generate.delay(f"bulk line {i}", model=MODEL, priority="batch", **SAMPLING)
            for i in range(BULK)]
    # The bulk job is under way, most of it still waiting in Redis at priority 9.
    wait_until(lambda: any(h.ready() for h in bulk[:64]), 120, "the bulk job to start")
    queued = queue_levels([MODEL])[MODEL]
    assert queued[9] > BULK // 2 and queued[0] == 0, queued

    # vLLM holds the worker's share of the job, waiting at priority 9.
    seen: dict[str, Any] = {}

    def waiting_at_nine() -> bool:
        engines = list_engines(MODEL)
        seen.update(engines[0] if engines else {})
        return bool(engines) and engines[0]["priorities"].get("9", {}).get("waiting", 0) > 0

    wait_until(waiting_at_nine, 30, "vLLM's waiting requests at priority 9 in fleet engines")
    assert seen["queued_by_priority"].get("9", 0) > 0, seen

    sent = time.monotonic()
    interactive = generate.delay("a person is waiting", model=MODEL, priority="interactive",
                                 **SAMPLING)
    completion = result_of(interactive, redis_client, 60)
    took = time.monotonic() - sent
    done = sum(h.ready() for h in bulk)
    assert completion["completion_tokens"] == 32
    # It finished while most of the job, sent before it, still waited.
    assert done < BULK // 2, f"{done} of {BULK} bulk tasks done before the interactive one"

    probe = engine_probe(app, worker.node)
    assert probe["priority"][interactive.id] == 0  # as vLLM's scheduler holds it
    bulk_seen = [probe["priority"][h.id] for h in bulk if h.id in probe["priority"]]
    assert bulk_seen and set(bulk_seen) == {9}

    for handle in bulk:
        assert result_of(handle, redis_client, 300)["completion_tokens"] == 32
    assert took < 30


def test_priority_survives_redelivery(worker: WorkerProc, fleet: Fleet, app: Any,
                                      redis_client: Any) -> None:
    """A worker killed while holding tasks: they come back on their own priority step and
    reach the next engine's scheduler at the priority they were sent with."""
    app.control.broadcast("probe_slow_steps", arguments={"seconds": 0.5},
                          destination=[worker.node], reply=True, timeout=5)
    handles = [generate.delay(f"held {i}", model=MODEL, priority=7, **SAMPLING)
               for i in range(8)]
    wait_until(lambda: all(h.id in engine_probe(app, worker.node)["added"] for h in handles),
               30, "the worker to hand the tasks to vLLM")
    fleet.kill(worker)
    # Back on the queue at their own step (kombu's step 6 holds priorities 6 to 8), after the
    # visibility timeout, by the restore of the next worker to start.
    second = fleet.start(MODEL, "p2", include="tests.engine_probe")
    fleet.wait_ready(app, second)
    try:
        for handle in handles:
            completion = result_of(handle, redis_client, 120 + VISIBILITY_TIMEOUT)
            assert completion["engine_id"] == "p2"
        probe = engine_probe(app, second.node)
        assert {probe["priority"][h.id] for h in handles} == {7}
    finally:
        fleet.stop(second)
