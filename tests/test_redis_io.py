"""The fleet's Redis I/O on the hot path: the result backend's one-round-trip write and the
transport's reused client. Against the session's real Redis; no worker needed."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from celery import states
from kombu import Connection

from producer.backend import ResultBackend


@pytest.fixture
def backend(app: Any) -> Any:
    return app.backend


def _stored(redis_client: Any, backend: Any, task_id: str) -> dict[str, Any]:
    raw = redis_client.get(backend.get_key_for_task(task_id))
    assert raw is not None
    return dict(json.loads(raw))


def _count_commands(monkeypatch: pytest.MonkeyPatch, client: Any) -> list[str]:
    sent: list[str] = []
    original = client.execute_command

    def counting(*args: Any, **kwargs: Any) -> Any:
        sent.append(str(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(client, "execute_command", counting)
    return sent


def test_the_fleet_uses_the_one_round_trip_backend(backend: Any) -> None:
    assert isinstance(backend, ResultBackend)


def test_a_result_is_written_in_one_round_trip_and_published(
    backend: Any, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend.mark_as_done(str(uuid.uuid4()), {"warm": True})  # loads the script
    task_id = str(uuid.uuid4())
    key = backend.get_key_for_task(task_id)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(key)
    pubsub.get_message(timeout=1.0)  # the subscription reply
    sent = _count_commands(monkeypatch, backend.client)

    backend.mark_as_done(task_id, {"text": "hi"})

    assert sent == ["EVALSHA"]  # Celery's own backend sends a GET, then MULTI/SET/PUBLISH/EXEC
    meta = _stored(redis_client, backend, task_id)
    assert meta["status"] == states.SUCCESS and meta["result"] == {"text": "hi"}
    assert meta["task_id"] == task_id
    message = pubsub.get_message(timeout=5.0)
    assert message is not None and json.loads(message["data"])["result"] == {"text": "hi"}
    pubsub.close()
    assert 0 < redis_client.ttl(key) <= backend.expires


def test_a_success_is_never_overwritten(backend: Any, redis_client: Any) -> None:
    """What Celery's read-before-write guarantees: a lost copy of a finished task that runs
    again and fails does not replace the answer the caller may already have read."""
    task_id = str(uuid.uuid4())
    backend.mark_as_done(task_id, {"text": "first"})
    backend.mark_as_failure(task_id, RuntimeError("a second run failed"))
    backend.mark_as_revoked(task_id, reason="late revoke")
    meta = _stored(redis_client, backend, task_id)
    assert meta["status"] == states.SUCCESS and meta["result"] == {"text": "first"}


def test_states_before_success_are_overwritten(backend: Any, redis_client: Any) -> None:
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, None, states.STARTED)
    assert _stored(redis_client, backend, task_id)["status"] == states.STARTED
    backend.mark_as_failure(task_id, RuntimeError("boom"))
    assert _stored(redis_client, backend, task_id)["status"] == states.FAILURE
    backend.mark_as_done(task_id, 1)  # a retry that succeeded
    assert _stored(redis_client, backend, task_id)["status"] == states.SUCCESS


def test_the_script_comes_back_after_redis_forgot_it(backend: Any, redis_client: Any) -> None:
    backend.mark_as_done(str(uuid.uuid4()), 0)
    redis_client.script_flush()  # what a Redis restart does to loaded scripts
    task_id = str(uuid.uuid4())
    backend.mark_as_done(task_id, 2)
    assert _stored(redis_client, backend, task_id)["result"] == 2


def test_a_value_that_is_not_json_is_overwritten(backend: Any, redis_client: Any) -> None:
    task_id = str(uuid.uuid4())
    redis_client.set(backend.get_key_for_task(task_id), b"\x80 not json")
    backend.mark_as_done(task_id, 3)
    assert _stored(redis_client, backend, task_id)["result"] == 3


def test_the_transport_reuses_one_client_per_channel(
    app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kombu builds a new redis.Redis for every publish and ack; ours keeps one per pool."""
    with Connection(app.conf.broker_url, transport="producer.transport:Transport") as conn:
        channel = conn.default_channel
        built: list[Any] = []
        original = channel._create_client

        def counting(*args: Any, **kwargs: Any) -> Any:
            built.append(args)
            return original(*args, **kwargs)

        monkeypatch.setattr(channel, "_create_client", counting)
        queue = f"fleet.test.{uuid.uuid4().hex}"
        with conn.Producer(channel) as producer:
            for i in range(5):
                producer.publish({"i": i}, routing_key=queue, declare=[])
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
        assert len(built) == 1
        assert first.llen(queue) == 5
        first.delete(queue)

        channel._disconnect_pools()  # what kombu does on a reconnect: the client follows
        with channel.conn_or_acquire() as third:
            assert third is not first and third.ping()
        assert len(built) == 2
