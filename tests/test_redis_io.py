"""The fleet's Redis I/O on the hot path: the result backend's one-round-trip write, the
transport's reused client and its backlog take. Against the session's real Redis; no worker
needed."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import pytest
import redis
from celery import states
from kombu import Connection
from kombu.utils.encoding import bytes_to_str

from producer import transport
from producer.backend import ResultBackend
from tests.redis_traffic import CONNECTION_SETUP, round_trips


@pytest.fixture
def backend(app: Any) -> Any:
    return app.backend


def _stored(redis_client: Any, backend: Any, task_id: str) -> dict[str, Any]:
    raw = redis_client.get(backend.get_key_for_task(task_id))
    assert raw is not None
    return dict(json.loads(raw))


def test_the_fleet_uses_the_one_round_trip_backend(backend: Any) -> None:
    assert isinstance(backend, ResultBackend)


def test_a_result_is_written_in_one_round_trip_and_published(
    backend: Any, redis_client: Any
) -> None:
    backend.mark_as_done(str(uuid.uuid4()), {"warm": True})  # loads the script
    task_id = str(uuid.uuid4())
    key = backend.get_key_for_task(task_id)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(key)
    pubsub.get_message(timeout=1.0)  # the subscription reply
    with round_trips(skip=CONNECTION_SETUP) as trips:
        backend.mark_as_done(task_id, {"text": "hi"})

    # Celery's own backend sends a GET, then MULTI/SET/PUBLISH/EXEC.
    assert trips == [["EVALSHA"]]
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
            assert third is not first and third.ping() is True
        assert len(built) == 2


def _queue_with(redis_client: Any, app: Any, bodies: list[Any], *, model: bool = False) -> str:
    """A fresh queue holding ``bodies`` (dicts go as kombu messages, bytes as they are); with
    ``model``, named as a model's queue (the fleet's producers keep a wake list for those)."""
    queue = f"fleet.{'model' if model else 'test'}.test-{uuid.uuid4().hex}"
    _publish(app, queue, bodies, redis_client)
    return queue


def _publish(app: Any, queue: str, bodies: list[Any], redis_client: Any = None) -> None:
    conn = Connection(app.conf.broker_url, transport="producer.transport:Transport")
    with conn, conn.Producer() as producer:
        for body in bodies:
            if isinstance(body, bytes):
                redis_client.lpush(queue, body)
            else:
                producer.publish(body, routing_key=queue, declare=[])


def _consume(app: Any, queue: str, prefetch: int, on_message: Any) -> Any:
    conn = Connection(app.conf.broker_url, transport="producer.transport:Transport")
    consumer = conn.Consumer([conn.SimpleQueue(queue).queue], callbacks=[on_message],
                             accept=["json"])
    consumer.qos(prefetch_count=prefetch)
    consumer.consume()
    return conn, consumer


def test_a_backlog_is_taken_in_one_round_trip_and_recorded_as_unacked(
    app: Any, redis_client: Any
) -> None:
    """A wait that finds messages brings the prefetch room's worth of them in one script call,
    each recorded in kombu's unacked set exactly as kombu records one (so it can be restored)."""
    queue = _queue_with(redis_client, app, [{"n": i} for i in range(50)])
    got: list[Any] = []
    conn, consumer = _consume(app, queue, 20, lambda body, message: got.append(message))
    channel = consumer.channel
    redis_client.script_load(transport.TAKE_SCRIPT)  # a first take may load it: another trip
    try:
        with round_trips(skip=CONNECTION_SETUP) as trips:
            conn.drain_events(timeout=2)
        assert [m.payload["n"] for m in got] == list(range(20))  # oldest first, prefetch held
        # The wait takes nothing; one script call pops and records all 20.
        assert trips == [["BLMOVE"], ["EVALSHA"]]
        assert redis_client.llen(queue) == 30
        recorded = {bytes_to_str(t) for t in redis_client.hkeys(channel.unacked_key)}
        tags = {m.delivery_tag for m in got}
        assert len(tags) == 20 and tags <= recorded
        assert channel.recorded == set()  # every taken tag went through QoS.append
        entry = json.loads(redis_client.hget(channel.unacked_key, got[5].delivery_tag))
        assert entry == [got[5]._raw, got[5].delivery_info["exchange"],
                         got[5].delivery_info["routing_key"]]
        assert redis_client.zscore(channel.unacked_index_key, got[5].delivery_tag) is not None

        channel.qos.restore_by_tag(got[5].delivery_tag)  # what a dead worker's sweep does
        assert redis_client.llen(queue) == 31
        for m in got[:5] + got[6:]:
            m.ack()
        assert not tags & {bytes_to_str(t) for t in redis_client.hkeys(channel.unacked_key)}
    finally:
        conn.release()
        redis_client.delete(queue)


def test_a_queue_consumed_without_acks_leaves_no_unacked_record(
    app: Any, redis_client: Any
) -> None:
    """A reply queue (Celery's remote-control replies) is consumed with no_ack: nothing would
    ever acknowledge a record of its messages, and the visibility sweep would deliver them
    again, for ever, to a caller still collecting replies."""
    queue = _queue_with(redis_client, app, [{"n": i} for i in range(3)])
    conn = Connection(app.conf.broker_url, transport="producer.transport:Transport")
    got: list[Any] = []
    consumer = conn.Consumer([conn.SimpleQueue(queue).queue], no_ack=True, accept=["json"],
                             callbacks=[lambda body, message: got.append(body)])
    consumer.consume()
    channel = consumer.channel
    try:
        before = set(redis_client.hkeys(channel.unacked_key))
        conn.drain_events(timeout=2)
        assert [body["n"] for body in got] == [0, 1, 2]
        assert set(redis_client.hkeys(channel.unacked_key)) == before
        consumer.cancel()  # consumed again with acks, its messages are recorded again
        assert queue not in channel._no_ack
    finally:
        conn.release()
        redis_client.delete(queue)


def test_a_malformed_message_in_a_backlog_fails_alone(app: Any, redis_client: Any) -> None:
    bad = b"{not json " + uuid.uuid4().hex.encode()
    bodies: list[Any] = [{"n": 0}, {"n": 1}, bad, {"n": 2}]
    queue = _queue_with(redis_client, app, bodies)
    got: list[Any] = []
    conn, consumer = _consume(app, queue, 10, lambda body, message: got.append(message))
    try:
        conn.drain_events(timeout=2)
        assert [m.payload["n"] for m in got] == [0, 1, 2]
        assert bad in redis_client.lrange("fleet.dead.malformed", 0, -1)
        assert redis_client.llen(queue) == 0
        for m in got:
            m.ack()
        assert not {m.delivery_tag for m in got} & {
            bytes_to_str(t) for t in redis_client.hkeys(consumer.channel.unacked_key)}
    finally:
        conn.release()
        redis_client.delete(queue)


def test_a_woken_wait_holds_no_message(app: Any, redis_client: Any) -> None:
    """Between the wait's answer and the take, the message is still on its queue: a worker
    killed there loses nothing (kombu's BRPOP has already popped it by then)."""
    queue = _queue_with(redis_client, app, [])
    conn, consumer = _consume(app, queue, 10, lambda body, message: None)
    channel = consumer.channel
    try:
        client = channel.client
        client.connection = client.connection_pool.get_connection()  # as kombu's poller
        channel._brpop_start(timeout=5)
        _publish(app, queue, [{"n": 0}])
        client.parse_response(client.connection, "BLMOVE")  # woken, as on_readable reads it
        channel._in_poll = None
        assert redis_client.llen(queue) == 1
        # (Other tests' workers share the unacked hash: look for this queue's message only.)
        assert not any(queue.encode() in entry
                       for entry in redis_client.hvals(channel.unacked_key))
        conn.release()  # killed before the take: the message waits for the next worker
        assert redis_client.llen(queue) == 1
    finally:
        redis_client.delete(queue)


def test_a_message_that_arrives_while_waiting_is_popped_and_recorded_together(
    app: Any, redis_client: Any
) -> None:
    """At low load the wait blocks until a message comes; the take then pops and records it in
    one script call: no BRPOP, no separate unacked write."""
    queue = _queue_with(redis_client, app, [])
    got: list[Any] = []
    conn, consumer = _consume(app, queue, 10, lambda body, message: got.append(message))
    channel = consumer.channel
    redis_client.script_load(transport.TAKE_SCRIPT)
    sent = threading.Event()
    start = channel._brpop_start

    def start_and_tell(*args: Any, **kwargs: Any) -> Any:
        result = start(*args, **kwargs)
        sent.set()
        return result

    channel._brpop_start = start_and_tell

    def publish_once_waiting() -> None:
        sent.wait(5)
        _publish(app, queue, [{"n": 0}])

    publisher = threading.Thread(target=publish_once_waiting)
    try:
        with round_trips(skip=CONNECTION_SETUP) as trips:
            publisher.start()
            conn.drain_events(timeout=5)
            publisher.join()
        assert [m.payload["n"] for m in got] == [0]
        # The publisher's own round trip (on a model's queue it also pushes the wake entry).
        consumer_trips = [t for t in trips if t not in (["LPUSH"], ["LPUSH", "LPUSH"])]
        assert consumer_trips == [["BLMOVE"], ["EVALSHA"]]
        assert got[0].delivery_tag in {
            bytes_to_str(t) for t in redis_client.hkeys(channel.unacked_key)}
        got[0].ack()
    finally:
        publisher.join()
        conn.release()
        redis_client.delete(queue)


class RecordingLoop:
    """Stands in for the worker's event loop: records the takes the channel schedules."""

    def __init__(self) -> None:
        self.later: list[tuple[float, Any]] = []

    def call_later(self, delay: float, callback: Any) -> object:
        self.later.append((delay, callback))
        return object()


def test_a_stream_is_taken_in_windows_and_a_lone_message_at_once(
    app: Any, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the last take found several messages less than TAKE_WINDOW_S ago, the next take
    waits that long (one take then serves many); a message that finds the channel idle is
    taken at once."""
    monkeypatch.setattr(transport, "TAKE_WINDOW_S", 30.0)  # wide: this test's own pace is slow
    queue = _queue_with(redis_client, app, [{"n": i} for i in range(3)])
    got: list[Any] = []
    conn, consumer = _consume(app, queue, 50, lambda body, message: got.append(message))
    channel = consumer.channel
    loop = conn.transport.loop = RecordingLoop()
    try:
        conn.drain_events(timeout=2)  # idle before: taken at once, all three
        assert [m.payload["n"] for m in got] == [0, 1, 2] and loop.later == []
        _publish(app, queue, [{"n": 3}, {"n": 4}])
        with pytest.raises(TimeoutError):  # woken, but the take is scheduled instead
            conn.drain_events(timeout=1)
        assert len(got) == 3 and [d for d, _ in loop.later] == [transport.TAKE_WINDOW_S]
        assert channel._brpop_start() is None and channel._in_poll is None  # no second wait
        _publish(app, queue, [{"n": 5}])  # arrives within the window: rides along
        loop.later.pop()[1]()
        assert [m.payload["n"] for m in got] == [0, 1, 2, 3, 4, 5]
        channel._last_take -= 60  # the stream stopped a while ago: a lone message
        _publish(app, queue, [{"n": 6}])
        conn.drain_events(timeout=2)
        assert [m.payload["n"] for m in got][-1] == 6 and loop.later == []
    finally:
        conn.release()
        redis_client.delete(queue)


def test_a_message_on_a_queue_not_waited_on_is_taken_when_the_wait_times_out(
    app: Any, redis_client: Any
) -> None:
    model_queue = f"fleet.model.test-{uuid.uuid4().hex}"
    other = _queue_with(redis_client, app, [{"n": 7}])
    got: list[Any] = []
    conn = Connection(app.conf.broker_url, transport="producer.transport:Transport")
    queues = [conn.SimpleQueue(q).queue for q in (model_queue, other)]
    consumer = conn.Consumer(queues, callbacks=[lambda body, message: got.append(message)],
                             accept=["json"])
    consumer.qos(prefetch_count=10)
    consumer.consume()
    try:
        t0 = time.monotonic()
        conn.drain_events(timeout=5)
        assert [m.payload["n"] for m in got] == [7]
        assert time.monotonic() - t0 < 3  # one brpop_timeout (1 s), not the drain's 5 s
        got[0].ack()
    finally:
        conn.release()
        redis_client.delete(model_queue, other)


def test_a_take_delivers_what_it_found(app: Any, redis_client: Any) -> None:
    queue = _queue_with(redis_client, app, [{"n": i} for i in range(3)])
    got: list[Any] = []
    conn, consumer = _consume(app, queue, 10, lambda body, message: got.append(message))
    channel = consumer.channel
    try:
        assert channel._take() == 3
        assert [m.payload["n"] for m in got] == [0, 1, 2]
        assert channel._take() == 0  # an empty queue: nothing taken
        for message in got:
            message.ack()
    finally:
        conn.release()
        redis_client.delete(queue)


def test_a_channel_closing_after_its_transport_fails_with_a_connection_error(
    app: Any, redis_client: Any
) -> None:
    """Celery's consumer, when Redis dies under it, runs ``collect()`` (which clears the
    transport's client) and then ``close()``; a channel whose close had stopped half way then
    requeues its held messages only at the second close. Kombu rebuilt its pool there and
    died on ``None.hostname`` (a worker lost to a Redis restart: "Unrecoverable error:
    AttributeError"). Now the requeue meets a connection error, which closing code ignores;
    the held message stays recorded in Redis for the visibility sweep."""
    queue = _queue_with(redis_client, app, [{"n": 0}])
    got: list[Any] = []
    conn, consumer = _consume(app, queue, 10, lambda body, message: got.append(message))
    channel = consumer.channel
    try:
        conn.drain_events(timeout=2)
        assert len(got) == 1  # held, unacknowledged
        channel._disconnect_pools()
        channel.connection.client = None  # what collect() leaves behind
        with pytest.raises(redis.exceptions.ConnectionError):
            channel.qos.restore_unacked()
        assert redis_client.hexists(channel.unacked_key, got[0].delivery_tag)
    finally:
        conn.release()  # the channel's close ignores the same connection error
        for message in got:
            redis_client.hdel(channel.unacked_key, message.delivery_tag)
            redis_client.zrem(channel.unacked_index_key, message.delivery_tag)
        redis_client.delete(queue)


def test_a_result_stored_while_the_result_consumer_reconnects_is_not_missed(
    app: Any, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A get() waiting when Redis goes away: Celery's result consumer reconnects by reading
    the stored results and then subscribing; a result stored in between (workers retry their
    writes the moment Redis is back) is published to nobody, and get() waits out its
    timeout. Here it arrives."""
    from celery.result import AsyncResult

    task_id = str(uuid.uuid4())
    result = AsyncResult(task_id, app=app)
    backend.add_pending_result(result)
    consumer, client = backend.result_consumer, backend.client
    original_pubsub, original_drain = client.pubsub, consumer._drain_one
    lost: list[bool] = []

    def drain_one(pubsub: Any, timeout: Any) -> Any:
        if not lost:  # the first read meets a dead connection
            lost.append(True)
            with consumer.reconnect_on_error():
                raise redis.exceptions.ConnectionError("Redis went away")
        return original_drain(pubsub, timeout)

    def pubsub_after_a_write(*args: Any, **kwargs: Any) -> Any:
        backend.store_result(task_id, {"late": True}, states.SUCCESS)  # the worker's retry
        monkeypatch.setattr(client, "pubsub", original_pubsub)
        return original_pubsub(*args, **kwargs)

    monkeypatch.setattr(consumer, "_drain_one", drain_one)
    monkeypatch.setattr(client, "pubsub", pubsub_after_a_write)
    assert result.get(timeout=3) == {"late": True}
    assert lost == [True]


def _publish_at(app: Any, queue: str, bodies: list[Any], priority: int) -> None:
    conn = Connection(app.conf.broker_url, transport="producer.transport:Transport")
    with conn, conn.Producer() as producer:
        for body in bodies:
            producer.publish(body, routing_key=queue, declare=[], priority=priority)


def test_a_message_of_any_priority_wakes_the_wait(app: Any, redis_client: Any) -> None:
    """The wait is on the queue's wake list, which every put of the fleet's transport touches:
    a message on a later priority step is taken at once, not when the wait times out."""
    queue = _queue_with(redis_client, app, [], model=True)
    got: list[Any] = []
    conn, _ = _consume(app, queue, 10, lambda body, message: got.append(message))
    try:
        for priority in (9, 5, 0):
            publisher = threading.Timer(0.3, _publish_at, (app, queue, [{"p": priority}],
                                                           priority))
            publisher.start()
            t0 = time.monotonic()
            conn.drain_events(timeout=5)
            publisher.join()
            assert got[-1].payload == {"p": priority}
            assert time.monotonic() - t0 < 0.9  # brpop_timeout is 1 s
        # The last take emptied every step: the wake list is gone, the next wait blocks.
        assert redis_client.exists(transport.wake_key(queue)) == 0
        for message in got:
            message.ack()
    finally:
        conn.release()
        redis_client.delete(queue, transport.wake_key(queue))


def test_sooner_steps_are_taken_first_and_room_is_kept_for_the_soonest(
    app: Any, redis_client: Any
) -> None:
    """A channel takes priority 0 before later steps, and fills at most its prefetch room less
    the part kept for step 0 with later steps: a message at priority 0 sent after a backlog of
    batch work is taken while that backlog still waits."""
    queue = _queue_with(redis_client, app, [], model=True)
    _publish_at(app, queue, [{"n": i} for i in range(40)], 9)
    _publish_at(app, queue, [{"n": "first"}], 0)
    got: list[Any] = []
    prefetch = 16
    conn, _ = _consume(app, queue, prefetch, lambda body, message: got.append(message))
    kept = transport.kept_room(prefetch)
    try:
        conn.drain_events(timeout=2)
        assert got[0].payload == {"n": "first"}  # sent last, taken first
        assert [m.payload["n"] for m in got[1:]] == list(range(prefetch - kept))
        assert len(got) == prefetch - kept + 1
        got[0].ack()  # the interactive task is done: its kept room is free again
        # Full but for the kept room: the wait is on priority 0's list alone ...
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.5)
        assert len(got) == prefetch - kept + 1  # the batch backlog stays in Redis
        # ... which a message at priority 0 wakes at once.
        threading.Timer(0.2, _publish_at, (app, queue, [{"n": "second"}], 0)).start()
        t0 = time.monotonic()
        conn.drain_events(timeout=5)
        assert got[-1].payload == {"n": "second"} and time.monotonic() - t0 < 0.9
        # Batch work that finishes frees its room for more batch work.
        for message in got[1:5]:
            message.ack()
        conn.drain_events(timeout=2)
        assert [m.payload["n"] for m in got[-4:]] == list(range(prefetch - kept,
                                                               prefetch - kept + 4))
        for message in got:
            if message.acknowledged is False:
                message.ack()
    finally:
        conn.release()
        redis_client.delete(queue, *(f"{queue}\x06\x16{s}" for s in (3, 6, 9)),
                            transport.wake_key(queue))


def test_a_restored_message_goes_back_to_its_own_priority_step(
    app: Any, redis_client: Any
) -> None:
    queue = _queue_with(redis_client, app, [], model=True)
    _publish_at(app, queue, [{"n": 1}], 7)
    got: list[Any] = []
    conn, consumer = _consume(app, queue, 10, lambda body, message: got.append(message))
    step = f"{queue}\x06\x166"  # kombu's step 6 holds priorities 6 to 8
    try:
        conn.drain_events(timeout=2)
        assert redis_client.llen(step) == 0 and not redis_client.exists(transport.wake_key(queue))
        consumer.channel.qos.restore_by_tag(got[0].delivery_tag)  # a dead worker's sweep
        assert redis_client.llen(step) == 1 and redis_client.llen(queue) == 0
        restored = json.loads(redis_client.lindex(step, 0))
        assert restored["properties"]["priority"] == 7
        assert restored["headers"]["redelivered"] is True
        assert redis_client.exists(transport.wake_key(queue))  # waiting workers wake
    finally:
        conn.release()
        redis_client.delete(queue, step, transport.wake_key(queue))


def test_a_message_given_back_at_a_clean_close_is_not_counted_as_lost(
    app: Any, redis_client: Any, backend: Any
) -> None:
    """A worker that stops cleanly gives back what it took and never ran (kombu requeues it as
    its channel closes): marked so, the next worker checks it for a stored result without
    counting it toward the dead-letter limit. Swept back from a dead worker, it counts."""
    from producer.naming import GIVEN_BACK_HEADER, deliveries_key
    from workers.delivery import Deliveries

    queue = _queue_with(redis_client, app, [{"n": 1}])
    task_id = f"given-back-{uuid.uuid4().hex}"
    deliveries = Deliveries(max_deliveries=1, ttl_s=60)

    def take() -> Any:
        got: list[Any] = []
        conn, consumer = _consume(app, queue, 10, lambda body, message: got.append(message))
        conn.drain_events(timeout=2)
        return conn, consumer, got[0]

    try:
        conn, _, message = take()
        assert GIVEN_BACK_HEADER not in message.headers
        conn.release()  # closed unacknowledged: given back
        assert redis_client.llen(queue) == 1
        conn, consumer, message = take()
        assert message.headers[GIVEN_BACK_HEADER] is True and message.headers["redelivered"]
        job = [(task_id, "fleet.generate", {})]
        # Given back any number of times, never dead-lettered (the limit here is one delivery).
        assert deliveries.check(backend, job, {task_id}) == [None]
        assert deliveries.check(backend, job, {task_id}) == [None]
        assert redis_client.get(deliveries_key(task_id)) is None
        consumer.channel.qos.restore_by_tag(message.delivery_tag)  # a dead worker's sweep
        conn.release()
        conn, _, message = take()
        assert GIVEN_BACK_HEADER not in message.headers and message.headers["redelivered"]
        message.ack()
        conn.release()
        verdict = deliveries.check(backend, job, set())[0]
        assert verdict is not None and "dead-lettered" in str(verdict)
    finally:
        redis_client.delete(queue, deliveries_key(task_id), "fleet.dead.unknown")
