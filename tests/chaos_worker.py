"""Test-only, for the chaos test: a fake engine that takes time, and a log of task runs.

Loaded into a worker by the tests only (``celery worker --include tests.chaos_worker``). The
fake engine answers at once; here each batch is answered ``LATENCY_S`` later, so a killed
worker usually holds tasks in flight, as a real engine's worker does. Every successful run
appends ``<task id> <engine id>`` to the Redis list ``RUNS_KEY`` (after the worker stored
the results of a batch), so a test can count how often each task really ran.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from producer.backend import ResultBackend
from workers.engines.base import EngineOutput, EngineRequest
from workers.engines.fake import FakeEngine

LATENCY_S = 0.2
RUNS_KEY = "test.chaos.runs"

_submit = FakeEngine.submit


def _slow_submit(self: FakeEngine, requests: Sequence[EngineRequest]) -> list[Future[EngineOutput]]:
    answers = _submit(self, requests)
    futures: list[Future[EngineOutput]] = [Future() for _ in answers]

    def answer() -> None:
        for future, done in zip(futures, answers, strict=True):
            error = done.exception()
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(done.result())

    threading.Timer(LATENCY_S, answer).start()
    return futures


FakeEngine.submit = _slow_submit  # type: ignore[method-assign]


_store_many = ResultBackend.store_many


def _logged_store_many(self: ResultBackend, results: list[tuple[str, Any, str, Any]],
                       then: Any = None) -> None:
    _store_many(self, results, then)
    runs = [f"{task_id} {result['engine_id']}" for task_id, result, state, _ in results
            if state == "SUCCESS" and isinstance(result, dict) and "engine_id" in result]
    if runs:
        self.client.rpush(RUNS_KEY, *runs)


ResultBackend.store_many = _logged_store_many  # type: ignore[method-assign]
