"""Fault injection against real processes: nothing lost, nothing run twice to different ends.

Workers of the model ``tiny-faults`` (real vLLM CPU engine, tiny model) are killed, poisoned,
revoked at and cut off from Redis; the session runs with a visibility timeout of
``VISIBILITY_TIMEOUT`` seconds and ``MAX_DELIVERIES`` deliveries (see conftest). The tests of
this module share one worker at a time and restart it, as a supervisor would, when a test
killed it; they run in file order.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from producer import DeadLettered, generate, generate_many, naming
from producer.celery_app import sweep_lock_expiry
from tests.conftest import MAX_DELIVERIES, VISIBILITY_TIMEOUT
from tests.harness import (
    PROBE,
    Fleet,
    WorkerProc,
    alive,
    engine_info,
    engine_probe,
    result_of,
    wait_until,
)

pytestmark = pytest.mark.engine

MODEL = "tiny-faults"
TIMEOUT = 240


class FaultFleet:
    """One `tiny-faults` worker at a time, restarted when a test killed it."""

    def __init__(self, fleet: Fleet, app: Any) -> None:
        self.fleet = fleet
        self.app = app
        self.started = 0
        self.current: WorkerProc | None = None

    def worker(self) -> WorkerProc:
        if self.current is None or self.current.process.poll() is not None:
            self.started += 1
            self.current = self.fleet.start(MODEL, f"f{self.started}",
                                            include=f"tests.engine_faults,{PROBE}")
            self.fleet.wait_ready(self.app, self.current)
        return self.current

    def kill(self) -> None:
        assert self.current is not None
        self.fleet.kill(self.current)
        self.current = None


@pytest.fixture(scope="module")
def faults(fleet: Fleet, app: Any) -> FaultFleet:
    return FaultFleet(fleet, app)


def redeliveries(redis_client: Any, task_id: str) -> int:
    """How often the task came back to a queue and was taken again (kombu's restores, counted
    by the worker; a requeue on purpose gives its count back)."""
    value = redis_client.get(f"fleet.deliveries.{task_id}")
    return int(value) if value else 0


def in_engine(app: Any, worker: WorkerProc, request_id: str) -> bool:
    """Whether the worker's vLLM engine was given the request (tests/engine_probe.py)."""
    return request_id in engine_probe(app, worker.node)["added"]


def _burst(n: int, tag: str) -> list[AsyncResult]:
    # Lengths spread out, so results arrive over time rather than all at one engine step.
    return [generate.delay(f"{tag} {i}", model=MODEL, max_tokens=16 + (i * 37) % 240,
                           temperature=0.0) for i in range(n)]


def test_sigkill_mid_batch_loses_nothing(faults: FaultFleet, redis_client: Any) -> None:
    killed = faults.worker()
    handles = _burst(120, "burst")
    wait_until(lambda: sum(h.ready() for h in handles) >= 5, TIMEOUT, "first results")
    before = {h.id: h.get(timeout=5) for h in handles if h.ready()}
    added = engine_probe(faults.app, killed.node)["added"]
    t_kill = time.monotonic()
    # Killed inside a sweep for dead workers' tasks: its lock stays until it expires, and no
    # worker sweeps meanwhile. Recovery must not wait kombu's default 300 s for it.
    redis_client.set(naming.UNACKED_MUTEX_KEY, "killed-mid-sweep",
                     ex=sweep_lock_expiry(VISIBILITY_TIMEOUT))
    faults.kill()
    held = [h for h in handles if not h.ready() and h.id in added]
    assert held, "no task was in the engine when the worker died: nothing was tested"

    back = faults.worker()  # what a supervisor does
    results = {h.id: h.get(timeout=TIMEOUT) for h in handles}
    recovery = time.monotonic() - t_kill
    print(f"all {len(handles)} answered {recovery:.1f}s after the SIGKILL (visibility timeout "
          f"{VISIBILITY_TIMEOUT}s, worker restart included)")

    assert all(r["completion_tokens"] >= 1 for r in results.values())
    for task_id, result in before.items():  # results stored before the kill stand
        assert results[task_id] == result
        assert result["engine_id"] == killed.engine_id
    counts = {h.id: redeliveries(redis_client, h.id) for h in handles}
    assert max(counts.values()) <= 1
    assert all(results[h.id]["engine_id"] == back.engine_id for h in held)
    assert all(counts[h.id] == 1 for h in held)
    # The engine itself: what was stored before the kill never reached it again; what the
    # killed worker held reached it exactly once.
    added = engine_probe(faults.app, back.node)["added"]
    assert not set(before) & set(added)
    assert all(added.get(h.id) == 1 for h in held)


def test_batch_longer_than_visibility_timeout_runs_once(faults: FaultFleet, app: Any,
                                                        redis_client: Any) -> None:
    worker = faults.worker()
    # Long by construction, however fast the engine: at least 64 steps of 0.25 s, 16 s in all,
    # four visibility timeouts.
    steps, delay = 64, VISIBILITY_TIMEOUT / 16
    items = [{"prompt": f"long {i}", "max_tokens": steps, "ignore_eos": True,
              "temperature": 0.0} for i in range(32)]
    app.control.broadcast("probe_slow_steps", destination=[worker.node], reply=True,
                          timeout=5, arguments={"seconds": delay})
    try:
        t0 = time.monotonic()
        handle = generate_many.delay(items, model=MODEL)
        out = handle.get(timeout=TIMEOUT)
        took = time.monotonic() - t0
    finally:
        app.control.broadcast("probe_slow_steps", destination=[worker.node], reply=True,
                              timeout=5, arguments={"seconds": 0.0})
    assert took >= steps * delay > 2 * VISIBILITY_TIMEOUT
    assert [item["ok"]["completion_tokens"] for item in out] == [steps] * len(items)
    assert redeliveries(redis_client, handle.id) == 0
    added = engine_probe(app, worker.node)["added"]
    assert [added.get(f"{handle.id}:{i}") for i in range(len(items))] == [1] * len(items)


def test_redelivered_task_with_a_stored_result_is_not_run_again(
    faults: FaultFleet, app: Any, redis_client: Any
) -> None:
    worker = faults.worker()
    task_id = str(uuid.uuid4())
    stored = {"text": "stored before the redelivery", "finish_reason": "stop"}
    app.backend.store_result(task_id, stored, "SUCCESS")
    # What kombu sends when it puts an unacknowledged message back on its queue.
    generate.apply_async(("Write a haiku",), {"model": MODEL, "max_tokens": 8}, task_id=task_id,
                         headers={"redelivered": True})
    wait_until(lambda: redeliveries(redis_client, task_id) == 1, 60, "the worker took the task")
    after = generate.delay("after", model=MODEL, max_tokens=2)
    assert after.get(timeout=60)["completion_tokens"] == 2
    wait_until(lambda: redis_client.hlen("unacked") == 0, 30, "the task was acknowledged")
    assert AsyncResult(task_id, app=app).get(timeout=5) == stored
    # The engine itself never saw the redelivered task, and saw the one sent after it.
    added = engine_probe(app, worker.node)["added"]
    assert task_id not in added and added.get(after.id) == 1


def test_poison_message_is_dead_lettered(faults: FaultFleet, redis_client: Any) -> None:
    worker = faults.worker()
    # Long enough (64 x 480 tokens) that every delivery is still running when it is killed.
    poison = generate_many.delay([{"prompt": "poison", "max_tokens": 480, "ignore_eos": True}]
                                 * 64, model=MODEL)
    for delivery in range(1, MAX_DELIVERIES + 1):
        wait_until(lambda w=worker: in_engine(faults.app, w, poison.id + ":0"),  # type: ignore[misc]
                   TIMEOUT, f"delivery {delivery}")
        faults.kill()  # the message kills its worker, every time
        worker = faults.worker()
    with pytest.raises(DeadLettered, match=f"after {MAX_DELIVERIES} deliveries"):
        poison.get(timeout=TIMEOUT)
    entry = json.loads(redis_client.lindex(f"fleet.dead.{MODEL}", 0))
    assert entry["id"] == poison.id
    assert entry["deliveries"] == MAX_DELIVERIES
    assert entry["kwargs"]["requests"][0]["prompt"] == "poison"
    later = generate.delay("the queue keeps flowing", model=MODEL, max_tokens=3)
    assert later.get(timeout=60)["completion_tokens"] == 3
    # A dead-lettered delivery never reached the engine of the worker that refused it.
    assert poison.id + ":0" not in engine_probe(faults.app, worker.node)["added"]


def test_engine_death_requeues_and_exits_non_zero(faults: FaultFleet, app: Any,
                                                  redis_client: Any) -> None:
    dying = faults.worker()
    tree = dying.tree()
    handles = _burst(80, "dying")
    wait_until(lambda: sum(h.ready() for h in handles) >= 3, TIMEOUT, "first results")
    app.control.broadcast("fault_engine_dead", destination=[dying.node], reply=True, timeout=5)
    code = dying.process.wait(120)
    assert code != 0
    assert not alive(tree)
    assert "engine died" in dying.log()
    replacement = faults.worker()
    results = [h.get(timeout=TIMEOUT) for h in handles]
    assert replacement.engine_id in {r["engine_id"] for r in results}
    # Requeued on purpose, at once: none of them counts as a delivery lost with a worker.
    assert all(redeliveries(redis_client, h.id) <= 0 for h in handles)
    assert any(redis_client.get(f"fleet.deliveries.{h.id}") is not None for h in handles)


def test_engine_core_process_death_requeues_and_exits_non_zero(
        faults: FaultFleet, fleet: Fleet, app: Any) -> None:
    """vLLM's engine core in a process of its own: its client would wait forever on a dead
    core; the worker sees the process exit and treats it as engine death."""
    other = faults.worker()
    dying = fleet.start(MODEL, "core1", include=PROBE,
                        env={"FLEET_ENGINE_MULTIPROCESSING": "true"})
    fleet.wait_ready(app, dying)
    tree = dying.tree()
    cores = [p for p in tree if "EngineCore" in " ".join([p.name(), *p.cmdline()])]
    assert len(cores) == 1, [(p.pid, p.name()) for p in tree]
    handles = _burst(120, "core")
    wait_until(lambda: len(engine_probe(app, dying.node)["added"]) >= 10, TIMEOUT,
               "the burst reaches the multiprocess engine")
    cores[0].kill()
    code = dying.process.wait(120)
    assert code != 0
    # vLLM's processes and multiprocessing's resource tracker see their parent go.
    wait_until(lambda: not alive(tree), 30, "no process of the worker left")
    # Seen by the watcher ("engine core process exited") or by vLLM's client first
    # (EngineDeadError from a step): engine death either way.
    assert "engine died" in dying.log()
    results = [h.get(timeout=TIMEOUT) for h in handles]  # none lost, none failed
    assert other.engine_id in {r["engine_id"] for r in results}


def test_revoked_waiting_task_never_runs(faults: FaultFleet) -> None:
    worker = faults.worker()
    blockers = [generate.delay(f"block {i}", model=MODEL, max_tokens=300) for i in range(64)]
    waiting = generate.delay("never run", model=MODEL, max_tokens=5)  # behind 64 in flight
    waiting.revoke()
    for b in blockers:
        b.get(timeout=TIMEOUT)
    with pytest.raises(TaskRevokedError):
        waiting.get(timeout=60)
    assert f"Discarding revoked task: {generate.name}[{waiting.id}]" in worker.log()
    assert not in_engine(faults.app, worker, waiting.id)
    assert in_engine(faults.app, worker, blockers[-1].id)  # the probe saw the batch around it


def test_revoked_running_task_is_aborted_in_the_engine(faults: FaultFleet, app: Any) -> None:
    worker = faults.worker()
    served = engine_info(app, worker.node)["requests_served"]
    # ignore_eos: a sampled end token would finish one early and count it as served.
    items = [{"prompt": f"abort me {i}", "max_tokens": 480, "ignore_eos": True}
             for i in range(256)]
    handle = generate_many.delay(items, model=MODEL)
    # vLLM's own count of unfinished requests, not the fleet's bookkeeping.
    wait_until(lambda: engine_probe(app, worker.node)["unfinished"] >= 64, 60, "it generates")
    t0 = time.monotonic()
    handle.revoke()
    with pytest.raises(TaskRevokedError):
        handle.get(timeout=60)
    # The result may say REVOKED a moment before the watcher's next look aborts the requests;
    # generating them to the end would take well over 10 s (see the long-batch test).
    wait_until(lambda: engine_probe(app, worker.node)["unfinished"] == 0, 10, "aborted")
    print(f"revoked task left the engine {time.monotonic() - t0:.2f}s after revoke()")
    info = engine_info(app, worker.node)
    assert info["in_flight"] == 0
    assert info["requests_served"] == served  # aborted, not finished
    # The next request has the engine to itself: nothing of the revoked task still runs.
    engine_probe(app, worker.node, reset=True)
    alone = generate.delay("alone", model=MODEL, max_tokens=8, ignore_eos=True)
    assert alone.get(timeout=60)["completion_tokens"] == 8
    assert engine_probe(app, worker.node)["peak_unfinished"] == 1


def test_get_timeout_leaves_the_task_running(faults: FaultFleet) -> None:
    faults.worker()
    # Celery checks a get() timeout between waits of up to 1 s on the result channel, so the
    # task must take clearly longer than that: it shares the engine with a running batch.
    busy = generate_many.delay([{"prompt": f"busy {i}", "max_tokens": 300, "ignore_eos": True}
                                for i in range(64)], model=MODEL)
    handle = generate.delay("take your time", model=MODEL, max_tokens=300, ignore_eos=True)
    with pytest.raises(CeleryTimeout):
        handle.get(timeout=0.05)
    assert handle.get(timeout=TIMEOUT)["completion_tokens"] == 300
    assert all(item["ok"]["completion_tokens"] == 300 for item in busy.get(timeout=TIMEOUT))


def test_redis_restart(faults: FaultFleet, workers_ab: tuple[WorkerProc, WorkerProc],
                       redis_server: Any, redis_client: Any) -> None:
    worker = faults.worker()
    handles = _burst(100, "restart")
    time.sleep(0.5)
    redis_server.stop()  # SIGTERM: Redis writes its AOF and exits
    try:
        t0 = time.monotonic()
        with pytest.raises(OperationalError):
            generate.delay("while Redis is down", model=MODEL, max_tokens=2)
        print(f"a producer got OperationalError {time.monotonic() - t0:.1f}s into the outage")
        time.sleep(2)
    finally:  # whatever failed above, later tests get their Redis back
        redis_server.start()
    # Queued before the restart: none lost.
    results = [result_of(h, redis_client, TIMEOUT) for h in handles]
    assert all(r["completion_tokens"] >= 1 for r in results)
    for model in ("tiny", "tiny-b", MODEL):  # every worker consumes again
        after = generate.delay("after", model=model, max_tokens=2).get(timeout=120)
        assert after["model"] == model and after["completion_tokens"] == 2
    assert all(w.process.poll() is None for w in (worker, *workers_ab))
