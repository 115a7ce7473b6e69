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
from producer.tasks import generate, generate_many
from tests.conftest import VISIBILITY_TIMEOUT
from tests.harness import Fleet, WorkerProc, engine_probe, result_of, wait_until

pytestmark = pytest.mark.engine

MODEL = "tiny-prio"
#: The bulk job: many-request chunks (more requests than vLLM's running batch holds, so some
#: wait inside the engine) and single tasks (more than the worker's room, so most wait in
#: Redis). At about 400 requests/s of 32 tokens, several seconds of work.
CHUNKS, CHUNK = 8, 128
SINGLES = 3_000
BULK = CHUNKS * CHUNK + SINGLES
SAMPLING = {"max_tokens": 32, "ignore_eos": True, "temperature": 0.0}


@pytest.fixture(scope="module")
def worker(fleet: Fleet, app: Any) -> WorkerProc:
    w = fleet.start(MODEL, "p1", include="tests.engine_probe")
    fleet.wait_ready(app, w)
    return w


def test_interactive_task_overtakes_a_queued_bulk_job(worker: WorkerProc, app: Any,
                                                      redis_client: Any) -> None:
    engine_probe(app, worker.node, reset=True)
    chunks = [generate_many.delay([{"prompt": f"bulk chunk {c} line {i}", **SAMPLING}
                                   for i in range(CHUNK)], model=MODEL)  # batch by default
              for c in range(CHUNKS)]
    singles = [generate.delay(f"bulk line {i}", model=MODEL, priority="batch", **SAMPLING)
               for i in range(SINGLES)]

    def done() -> int:
        """Bulk requests with a stored result (one MGET: counting takes no time)."""
        keys = [f"celery-task-meta-{h.id}" for h in chunks + singles]
        stored = [v is not None for v in redis_client.mget(keys)]
        return CHUNK * sum(stored[:CHUNKS]) + sum(stored[CHUNKS:])

    # The job is under way: vLLM holds requests waiting at priority 9, most single tasks
    # still wait in Redis at priority 9, and fleet engines shows both.
    seen: dict[str, Any] = {}

    def waiting_at_nine() -> bool:
        engines = list_engines(MODEL)
        seen.update(engines[0] if engines else {})
        return bool(engines) and engines[0]["priorities"].get("9", {}).get("waiting", 0) > 0

    wait_until(waiting_at_nine, 60, "vLLM's waiting requests at priority 9 in fleet engines")
    assert seen["queued_by_priority"].get("9", 0) > SINGLES // 2, seen
    assert queue_levels([MODEL])[MODEL][0] == 0

    left = BULK - done()
    sent = time.monotonic()
    interactive = generate.delay("a person is waiting", model=MODEL, priority="interactive",
                                 **SAMPLING)
    completion = result_of(interactive, redis_client, 60)
    took = time.monotonic() - sent
    still = BULK - done()
    assert completion["completion_tokens"] == 32
    # It finished while most of the job sent before it, and not done then, still waited.
    assert still > left // 2, f"{left - still} of the {left} bulk requests left finished first"

    for chunk in chunks:
        assert all(item["ok"]["completion_tokens"] == 32
                   for item in result_of(chunk, redis_client, 300))
    for handle in singles:
        assert result_of(handle, redis_client, 300)["completion_tokens"] == 32
    assert took < 30

    # Every request reached vLLM's scheduler at the priority it was sent with.
    probe = engine_probe(app, worker.node)
    assert probe["priority"][interactive.id] == 0
    bulk_ids = {f"{h.id}:{i}" for h in chunks for i in range(CHUNK)} | {h.id for h in singles}
    bulk_seen = [p for rid, p in probe["priority"].items() if rid in bulk_ids]
    assert len(bulk_seen) == BULK and set(bulk_seen) == {9}


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
