"""Chaos: a steady stream of tasks while workers are SIGKILLed at random moments.

Real Redis, real `fleet worker` processes (Celery, the fleet's transport, delivery checks and
lease), and the deterministic fake engine made slow (tests/chaos_worker.py): what is tested is
delivery, not generation, and twenty restarts of the real engine would take minutes. The real
engine's own crash recovery is tested in tests/test_reliability.py.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from celery.result import AsyncResult

from producer import generate
from tests.harness import Fleet, result_of

MODEL = "chaos"
KILLS = 20
SEND_PER_S = 40  # each message meets a waiting worker: the fetch path runs for every one
TIMEOUT = 240


@pytest.fixture
def chaos_fleet(fleet_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
                redis_client: Any) -> Iterator[Fleet]:
    from tests.chaos_worker import RUNS_KEY

    redis_client.delete(RUNS_KEY)
    env = {**fleet_env, "FLEET_WORKER_CONCURRENCY": "16",
           # Killed many times over, a task may be held by several victims: not poison here.
           "FLEET_MAX_DELIVERIES": "1000"}
    fleet = Fleet(env, tmp_path_factory.mktemp("chaos-logs"))
    try:
        yield fleet
    finally:
        fleet.stop_all()


def test_random_sigkills_lose_nothing_and_run_nothing_twice(
    chaos_fleet: Fleet, app: Any, redis_client: Any
) -> None:
    from tests.chaos_worker import RUNS_KEY

    rng = random.Random(20261203)
    started = iter(range(1, 1000))
    slots = [chaos_fleet.start(MODEL, f"chaos{next(started)}", include="tests.chaos_worker")
             for _ in range(2)]
    chaos_fleet.wait_ready(app, *slots)

    handles: list[AsyncResult] = []
    stop = threading.Event()

    def send() -> None:
        i = 0
        while not stop.is_set():
            handles.append(generate.delay(f"chaos {i}", model=MODEL, max_tokens=3))
            i += 1
            time.sleep(1 / SEND_PER_S)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.8, 2.0))
            slot = rng.randrange(len(slots))
            chaos_fleet.kill(slots[slot])
            slots[slot] = chaos_fleet.start(MODEL, f"chaos{next(started)}",
                                            include="tests.chaos_worker")
    finally:
        stop.set()
        sender.join()
    t0 = time.monotonic()
    results = {h.id: result_of(h, redis_client, TIMEOUT) for h in handles}  # none lost
    print(f"{len(handles)} tasks, {KILLS} kills; the last result came "
          f"{time.monotonic() - t0:.1f}s after the stream stopped")

    # Each answer is the one its own prompt gives (the fake engine echoes it).
    assert all(results[h.id]["text"] == f"chaos {i} chaos" for i, h in enumerate(handles))
    # The kills hit workers that held work: tasks came back and were taken again.
    redelivered = sum(redis_client.exists(f"fleet.deliveries.{h.id}") for h in handles)
    assert redelivered > 0
    # No task ran to a result twice, and every logged run is the stored result's.
    runs = [bytes(r).decode().split() for r in redis_client.lrange(RUNS_KEY, 0, -1)]
    counts = Counter(task_id for task_id, _ in runs)
    assert max(counts.values()) == 1
    assert all(results[task_id]["engine_id"] == engine for task_id, engine in runs
               if task_id in results)
