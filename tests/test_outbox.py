"""The outbox on its own (unit level: stand-ins for the message, its channel and the backend)."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from celery.worker import state as worker_state

from producer.errors import InvalidRequest
from producer.settings import ModelConfig
from workers.job import Job
from workers.outbox import Outbox
from workers.runtime import Runtime


class Channel:
    """What the outbox uses of the fleet's transport channel."""

    def __init__(self) -> None:
        self.acked_tags: list[str] = []
        self.forgotten: list[str] = []
        self.qos = SimpleNamespace(can_consume=lambda: True)

    def shares_redis(self, client: Any) -> bool:
        return False

    def forget_unacked(self, tags: list[str], pipe: Any = None) -> None:
        self.forgotten += tags

    def acked(self, messages: list[Any]) -> None:
        self.acked_tags += [m.delivery_tag for m in messages]


class Backend:
    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.stored: list[tuple[str, Any, str, Any]] = []
        self.client = object()

    def store_many(self, results: list[tuple[str, Any, str, Any]], then: Any = None) -> None:
        if self.fail:
            raise ConnectionError("Redis is away")
        self.stored += results


def _job(channel: Channel, backend: Backend, task_id: str) -> Job:
    message = SimpleNamespace(headers={"id": task_id}, delivery_info={}, channel=channel,
                              delivery_tag=f"tag-{task_id}")
    task = SimpleNamespace(name="fleet.generate", backend=backend, send_events=False)
    job = Job(message, task, [], {}, "w@h")
    worker_state.task_reserved(job)
    return job


def _outbox() -> Outbox:
    runtime = Runtime(model_id="m", engine_id="e1", config=ModelConfig(model="x", engine="fake"),
                      gpus=[])
    outbox = Outbox(runtime, deliveries=None)
    outbox.start()
    return outbox


def _until(predicate: Any) -> None:
    deadline = time.monotonic() + 5
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_results_are_stored_before_their_messages_are_acknowledged() -> None:
    channel, backend = Channel(), Backend(fail=False)
    outbox = _outbox()
    job = _job(channel, backend, "t1")
    try:
        outbox.put(job, InvalidRequest("prompt: empty"))
        _until(lambda: channel.acked_tags)
        assert [(task_id, state) for task_id, _, state, _ in backend.stored] == [("t1", "FAILURE")]
        assert channel.forgotten == ["tag-t1"] and job.acknowledged
        assert "t1" not in worker_state.requests
    finally:
        outbox.stop()


def test_a_batch_that_cannot_be_stored_is_let_go_not_acknowledged() -> None:
    # Held forever, the lease would keep renewing it and no worker would ever run it again.
    channel, backend = Channel(), Backend(fail=True)
    outbox = _outbox()
    job = _job(channel, backend, "t2")
    try:
        outbox.put(job, InvalidRequest("prompt: empty"))
        _until(lambda: "t2" not in worker_state.requests)
        assert channel.forgotten == []  # still unacknowledged in Redis: it comes back
        assert channel.acked_tags == ["tag-t2"] and not job.acknowledged  # its room is free
    finally:
        outbox.stop()
