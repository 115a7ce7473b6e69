"""Kombu's Redis transport, hardened against malformed messages on a queue.

Kombu parses each message it pops from a Redis list on the worker's event loop; a body that is
not JSON, not UTF-8, or not shaped like a kombu message raises out of that loop, and the worker
dies ("Unrecoverable error: JSONDecodeError"). Since the message is already popped, it is gone,
and the next worker to start would meet the next such message. This transport refuses such a
message instead: it logs it and keeps its raw bytes in the Redis list ``fleet.dead.malformed``
(no worker consumes it), and the worker goes on. Messages that are well-formed for kombu but not
for Celery (unknown task, pickle content, bad headers) are Celery's to refuse, and it does.

Two costs of kombu's transport are cut, both on the path of every task:

- kombu builds a new ``redis.Redis`` for every command it sends without a client (each publish,
  ack and event), about 0.3 ms of Python per message on a 2-core machine; a channel here keeps
  one client.
- kombu fetches one message per BRPOP, then records it as unacknowledged in a second round trip
  (``QoS.append``), which leaves a window in which a killed worker loses the message. A channel
  here waits without popping (``BLMOVE`` of a list onto itself), then takes up to its prefetch
  room of waiting messages in one Lua script (``producer/lua/take.lua``), which pops them and
  records them as unacknowledged in the same atomic step: no message is ever popped without
  being recorded, and one round trip serves a backlog. While messages arrive faster than the
  worker takes them, the next take waits ``TAKE_WINDOW_S`` so that one take serves many; a lone
  message is taken at once.

Priorities: kombu keeps each priority step of a queue (0, 3, 6, 9; a message goes to the highest
step at or below its priority) in a list of its own, and the take empties sooner steps first.
Redis blocks on one list at a time, so the fleet's puts also push an entry to the queue's wake
list (``producer.naming.wake_key``), which the take removes once every step is empty: a worker
waits on that one key and wakes for a message of any priority. A worker keeps a room of its own
for step 0 (``interactive``, 1/``URGENT_SHARE`` more), so a room full of batch work still takes an
interactive task at once (the worker's prefetch is its room plus that share, so the rest keep
their whole room); vLLM's priority scheduling then runs it ahead of the batch requests
waiting in the engine. A producer that does not use this transport (stock kombu) pushes no wake
entry: its messages are taken at the latest when the wait times out (``brpop_timeout``, 1 s).

Selected by the fleet's Celery config (``broker_transport``); ``redis://`` and ``rediss://`` URLs
work unchanged. :class:`Connection` names such a connection by its URL's scheme, as tools that
read the broker's URL (Flower) expect.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from operator import itemgetter
from typing import Any

import kombu
import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.transport.virtual import Empty
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps

from producer.naming import GIVEN_BACK_HEADER, MALFORMED_QUEUE, MODEL_QUEUE_PREFIX, wake_key

log = logging.getLogger(__name__)

#: While messages arrive faster than the worker takes them (the last take, less than this
#: long ago, found more than one), the next take waits this long, so that one take serves many
#: of them: each take and the batch behind it cost the worker about half a millisecond of CPU
#: however few messages it holds. A message that finds the worker idle, or a caller that sends
#: one request at a time, is taken at once.
TAKE_WINDOW_S = 0.004

#: Raw bytes of one malformed message kept in the dead-letter list (the rest is cut off).
MALFORMED_KEEP_BYTES = 64 * 1024


class MalformedMessage(ValueError):
    """A message popped from a queue that is not a kombu message envelope."""

    def __init__(self, reason: str, raw: Any) -> None:
        super().__init__(reason)
        self.raw = raw


def _check_envelope(payload: Any) -> None:
    if not isinstance(payload, dict):
        raise MalformedMessage(f"envelope is a {type(payload).__name__}, not an object", payload)
    properties = payload.get("properties")
    if not isinstance(properties, dict) or not isinstance(properties.get("delivery_info"), dict):
        raise MalformedMessage("envelope has no properties.delivery_info", payload)
    if not isinstance(properties.get("delivery_tag"), str):
        raise MalformedMessage("envelope has no properties.delivery_tag", payload)
    if not isinstance(payload.get("body", ""), str) or not isinstance(
            payload.get("headers") or {}, dict):
        raise MalformedMessage("envelope body or headers have the wrong type", payload)


#: A worker's room for messages of the soonest priority step (``interactive``) is its room for
#: the others and an eighth more (at least one): a room filled with later work still takes them.
#: The worker raises its prefetch by that eighth (``workers/bootstep.py``, :func:`kept_room`).
URGENT_SHARE = 8


def kept_room(prefetch: int) -> int:
    """Of a prefetch room, the part kept for the soonest step: the eighth added on top of the
    room for the rest (prefetch = room + room // URGENT_SHARE)."""
    return max(1, prefetch // (URGENT_SHARE + 1))


def urgent_extra(room: int) -> int:
    """What a worker whose room for later steps is ``room`` adds to its prefetch."""
    return max(1, room // URGENT_SHARE)
#: While only that kept room is left, the worker waits on the soonest step's list; it takes
#: from the other steps again as soon as its tasks finish (``Channel.acked``), and at the latest
#: after this long.
FULL_WAIT_S = 0.05

#: At most this many messages per take (besides the prefetch room).
TAKE_MAX = 128
#: The take script (``producer/lua/take.lua``), read once.
TAKE_SCRIPT = (resources.files("producer") / "lua" / "take.lua").read_text()
TAKE_SHA = hashlib.sha1(TAKE_SCRIPT.encode()).hexdigest()  # what Redis names it by


class QoS(kombu_redis.QoS):
    """Kombu's Redis QoS, skipping the unacked write for messages the take already recorded."""

    def restore_unacked(self, client: Any = None) -> Any:
        """At the channel's close: what this worker took and never acknowledged goes back,
        marked as given back (see :meth:`Channel._do_restore_message`)."""
        self.channel.giving_back = True
        try:
            return super().restore_unacked(client)
        finally:
            self.channel.giving_back = False

    def append(self, message: Any, delivery_tag: str) -> None:
        recorded = self.channel.recorded
        if delivery_tag in recorded:
            recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # this process's bookkeeping only
        else:
            super().append(message, delivery_tag)


class Message(kombu_redis.Channel.Message):  # type: ignore[misc,valid-type]
    """A kombu message whose envelope is checked before kombu reads it."""

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        _check_envelope(payload)
        try:
            super().__init__(payload, channel=channel, **kwargs)
        except (TypeError, ValueError, KeyError) as e:  # e.g. a body that is not base64
            raise MalformedMessage(f"{type(e).__name__}: {e}", payload) from e


class Channel(kombu_redis.Channel):
    """A Redis channel that refuses malformed messages instead of dying on them."""

    Message = Message
    QoS = QoS
    _shared: tuple[Any, Any] | None = None  # (connection pool, client on it)
    _last_take = 0.0  # monotonic time of the last take that found messages
    _stream = False  # the last take found more than one message
    _take_due: Any = None  # the timer of a take scheduled after TAKE_WINDOW_S
    _full_wait = False  # the wait is on the soonest step only: the room for later ones is full
    giving_back = False  # restoring at close what this worker took and never acknowledged

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Tags the take recorded as unacknowledged, until QoS.append sees them.
        self.recorded: set[str] = set()
        #: Queues consumed without acknowledgements (a client's reply queue): the take records
        #: nothing for them, or the visibility sweep would deliver their messages again.
        self._no_ack: set[str] = set()
        #: Tags of held messages taken from later priority steps than the soonest.
        self._held_later: set[str] = set()

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """The given client, or this channel's own (kombu would build a new one each time).

        A ``redis.Redis`` takes a pooled connection per command, so one client is safe across
        threads; it is rebuilt when kombu replaces the channel's pool (reconnects, forks).
        """
        if client:
            yield client
            return
        if self._pool is None and getattr(self.connection, "client", None) is None:
            # The transport is closed (kombu cleared its client) and the pool with it: kombu
            # would die on None.hostname rebuilding the pool, an AttributeError nobody expects
            # while closing (after a Redis restart, a channel's close requeues held messages
            # late, and the worker would exit "Unrecoverable error"). A connection error is what
            # the closing code ignores; the held messages come back by the visibility sweep.
            raise redis.exceptions.ConnectionError("the channel's transport is closed")
        pool = self.pool
        shared = self._shared
        if shared is None or shared[0] is not pool:
            shared = self._shared = (pool, self._create_client())
        yield shared[1]

    def basic_consume(self, queue: str, no_ack: bool, callback: Any, consumer_tag: str,
                      **kwargs: Any) -> Any:
        def guarded(message: Any) -> Any:
            try:
                return callback(message)
            except Exception as e:  # Celery could not read it (e.g. a body that decodes to b"")
                self._refuse(MalformedMessage(f"{type(e).__name__}: {e}",
                                              getattr(message, "_raw", message)))
                try:
                    message.ack()  # out of kombu's unacked set, or it would come back forever
                except Exception:
                    log.debug("could not ack the refused message", exc_info=True)
                return None

        if no_ack:  # taken unrecorded, as kombu's own pop takes them (reply queues)
            self._no_ack.add(queue)
        return super().basic_consume(queue, no_ack, guarded, consumer_tag, **kwargs)

    def basic_cancel(self, consumer_tag: str) -> Any:
        self._no_ack.discard(self._tag_to_queue.get(consumer_tag, ""))
        return super().basic_cancel(consumer_tag)

    def forget_unacked(self, tags: list[str], pipe: Any = None) -> None:
        """Drop acknowledged messages from Redis's unacked records: one round trip for any
        number of them, safe from any thread (:meth:`acked` then does this process's part).
        With ``pipe`` (a pipeline on this channel's Redis, see :meth:`shares_redis`) the
        commands join it instead."""
        if not tags:
            return
        if pipe is not None:
            pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags)
            return
        with self.conn_or_acquire() as client:
            client.pipeline().zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags
                                                                        ).execute()

    def shares_redis(self, client: Any) -> bool:
        """Whether ``client`` (say, the result backend's) talks to this channel's Redis
        database with the same key names, so both can share one pipeline."""
        if self.global_keyprefix:
            return False
        mine = self.pool.connection_kwargs
        theirs = client.connection_pool.connection_kwargs
        return all(mine.get(k) == theirs.get(k) for k in ("host", "port", "path", "db"))

    def acked(self, messages: list[Any]) -> None:
        """This process's bookkeeping of messages :meth:`forget_unacked` dropped: the prefetch
        room they held. Safe from any thread: kombu's QoS only adds their tags to a set here
        (atomic under the GIL), which the event loop's thread drains."""
        for message in messages:
            virtual.QoS.ack(self.qos, message.delivery_tag)
            message._state = "ACK"
        loop = getattr(self.connection, "loop", None)
        if self._full_wait and loop is not None:
            # The room for later steps was full and now frees: take them rather than wait for
            # the wait on the soonest step to time out (the hub's call_soon wakes it).
            loop.call_soon(self._room_freed)

    def _room_freed(self) -> None:
        """On the event loop: a take of later steps, TAKE_WINDOW_S from now, so that the room
        freed by the tasks finishing meanwhile fills in one take, as a stream's takes do (the
        wait on the soonest step goes on; each later burst of finished tasks takes again)."""
        loop = getattr(self.connection, "loop", None)
        if (self._full_wait and not self._closing and self._take_due is None
                and loop is not None and self._later_room() > 0):
            self._take_due = loop.call_later(TAKE_WINDOW_S, self._take_late)

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        """Kombu's put (the message goes to its priority step's list), and an entry on the
        queue's wake list in the same round trip: a worker waiting on that one key wakes for
        a message of any priority."""
        if (self.global_keyprefix or (self._expires and queue in self._expires)
                or not queue.startswith(MODEL_QUEUE_PREFIX)):
            # kombu's own path: no worker waits on another queue's wake list (an engine's own
            # queue is looked at when the wait times out), so none is kept for it.
            return super()._put(queue, message, **kwargs)
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        wake, body = wake_key(queue), dumps(message)
        batch = kwargs.get("_publish_batch")
        if batch is not None:
            batch.add("lpush", key, body)
            batch.add("lpush", wake, 1)
            return None
        with self.conn_or_acquire() as client:
            client.pipeline(transaction=False).lpush(key, body).lpush(wake, 1).execute()
        return None

    def _do_restore_message(self, payload: Any, exchange: str, routing_key: str, pipe: Any,
                            leftmost: bool = False) -> None:
        """A redelivered message goes back to the list of its own priority step (kombu reads
        the step from the message) and wakes the workers waiting on its queue.

        It says whether it is given back by a worker closing its channel (a clean stop: taken
        but never run, not lost with a worker) or swept back from a dead worker or requeued:
        the worker that takes it next counts only the latter (``workers/delivery.py``)."""
        headers = payload.get("headers")
        if isinstance(headers, dict):
            if self.giving_back:
                headers[GIVEN_BACK_HEADER] = True
            else:
                headers.pop(GIVEN_BACK_HEADER, None)
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        for queue in self._lookup(exchange, routing_key):
            if queue.startswith(MODEL_QUEUE_PREFIX):
                pipe.lpush(wake_key(queue), 1)

    def _brpop_start(self, timeout: float | None = None) -> None:
        """Wait for a message without taking it: ``BLMOVE w w RIGHT RIGHT`` on the model
        queue's wake list answers as soon as it holds an entry (a producer pushed a message of
        any priority) and leaves it as it was. The take that follows pops and records in one
        atomic step, so no message is ever popped without being recorded.

        While the room kept for the soonest priority step is all that is left, the wait is on
        that step's list instead (only such a message can be taken); finished tasks that free
        room for later steps take them at once (:meth:`acked`)."""
        if self.global_keyprefix:  # kombu's own path (the take's keys are not prefixed)
            return super()._brpop_start(timeout)
        if self._take_due is not None:  # a take is scheduled: it comes first
            return None
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        # Redis blocks on one list at a time here: the model queue's, where the traffic is. A
        # message on another queue (an engine's own) is taken at the latest when the wait
        # times out (brpop_timeout, 1 s).
        model = _model_queue(queues)
        wait = self.brpop_timeout if timeout is None else timeout
        self._full_wait = self._later_room() <= 0
        if self._full_wait:
            key, wait = self._q_for_pri(model, 0), min(wait, FULL_WAIT_S)
        elif model.startswith(MODEL_QUEUE_PREFIX):
            key = wake_key(model)
        else:  # a queue with no wake list: its soonest step, as kombu's own wait
            key = self._q_for_pri(model, 0)
        self._in_poll = self.client.connection
        # kombu's half-open socket check reads when the wait was sent.
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]
        self.client.connection.send_command("BLMOVE", key, key, "RIGHT", "RIGHT", wait)
        return None

    def _brpop_read(self, **options: Any) -> Any:
        if self.global_keyprefix:
            return self._kombu_brpop_read(**options)
        try:
            try:
                self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # reconnect on the next start, as kombu
                raise
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._full_wait = False
            self._flush_brpop_reauth()
        # Woken (or timed out, when another queue may hold something): take what waits,
        # after TAKE_WINDOW_S when the last take was that recent (a stream of messages).
        if self._closing:
            raise Empty()
        loop = getattr(self.connection, "loop", None)
        if (loop is not None and self._stream
                and time.monotonic() - self._last_take < TAKE_WINDOW_S):
            self._take_due = loop.call_later(TAKE_WINDOW_S, self._take_late)
            raise Empty()
        if not self._take():
            raise Empty()
        return True

    def _take_late(self) -> None:
        self._take_due = None
        if not self._closing:
            self._take()

    def _kombu_brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except ValueError as e:  # JSON, UTF-8, base64 and envelope errors are all ValueErrors
            self._refuse(e)
            raise Empty() from None

    def _take(self) -> int:
        """Take up to the prefetch room of waiting messages in one round trip, each recorded as
        unacknowledged in the same atomic step, and deliver them; returns how many. Messages
        of later priority steps fill the room only up to the share kept for the soonest."""
        room = self.qos.can_consume_max_estimate()
        count = TAKE_MAX if room is None else min(room, TAKE_MAX)
        queues = list(self.active_queues)
        if count <= 0 or not queues:
            return 0
        model = _model_queue(queues)
        first, *later = self.priority_steps
        keys = [self.unacked_key, self.unacked_index_key, wake_key(model),
                *(self._q_for_pri(q, first) for q in queues),
                *(self._q_for_pri(q, pri) for pri in later for q in queues)]
        lists = [*queues, *(q for _ in later for q in queues)]
        record = ["0" if q in self._no_ack else "1" for q in lists]
        with self.conn_or_acquire() as client:
            taken = self._take_script_call(client, keys, count, len(queues), self._later_room(),
                                           record)
        for i in range(0, len(taken), 3):
            n, tag, raw = int(taken[i]), bytes_to_str(taken[i + 1]), taken[i + 2]
            queue = self._queue_of(keys[n + 2])
            if tag:
                self.recorded.add(tag)
                if n > len(queues):
                    self._held_later.add(tag)
            try:
                self.connection._deliver(json.loads(bytes_to_str(raw)), queue)
            except ValueError as e:  # JSON, UTF-8, base64 and envelope errors
                self._refuse(MalformedMessage(f"{type(e).__name__}: {e}", raw))
                if tag:  # its unacked record goes too
                    self.recorded.discard(tag)
                    self.forget_unacked([tag])
        if taken:
            self._queue_cycle.rotate(self._queue_of(keys[int(taken[-3]) + 2]))
            self._last_take = time.monotonic()
        self._stream = len(taken) > 3  # more than one: messages arrive faster than taken
        return len(taken) // 3

    def _later_room(self) -> int:
        """How many more messages of later priority steps than the soonest this channel may
        take: its prefetch room less the part kept for the soonest step (:func:`kept_room`)."""
        qos = self.qos
        limit = qos.prefetch_count
        if not limit:
            return TAKE_MAX
        held = qos._delivered
        dirty = qos._dirty
        self._held_later = {t for t in self._held_later if t in held and t not in dirty}
        return max(0, min(limit - kept_room(limit) - len(self._held_later),
                          qos.can_consume_max_estimate() or 0))

    def _take_script_call(self, client: Any, keys: list[str], count: int, urgent: int,
                          later: int, record: list[str] | None = None) -> Any:
        record = record or ["1"] * (len(keys) - 3)
        args = [len(keys), *keys, count, time.time(), urgent, later, *record]
        try:
            return client.execute_command("EVALSHA", TAKE_SHA, *args)
        except redis.exceptions.NoScriptError:  # a first take, or Redis lost its scripts
            client.script_load(TAKE_SCRIPT)
            return client.execute_command("EVALSHA", TAKE_SHA, *args)

    def _queue_of(self, key: str) -> str:
        """The queue a list key belongs to (kombu adds a priority suffix after ``sep``)."""
        return key.rsplit(self.sep, 1)[0] if self.sep in key else key

    def _refuse(self, error: ValueError) -> None:
        # Each error type keeps what it failed on: that is the raw message.
        raw = getattr(error, "raw", None) or getattr(error, "doc", None) or getattr(
            error, "object", None)
        try:
            with self.conn_or_acquire() as client:
                keep_malformed(client, raw, str(error))
        except Exception:
            log.exception("could not keep the malformed message in %s", MALFORMED_QUEUE)


def _model_queue(queues: list[str]) -> str:
    """The queue a worker's wait and wake list follow: its model's, where the traffic is."""
    return next((q for q in queues if q.startswith(MODEL_QUEUE_PREFIX)), queues[0])


def malformed_entry(raw: Any, reason: str) -> bytes:
    """What ``fleet.dead.malformed`` keeps of a refused message.

    Raw bytes that are no envelope are kept as they are (cut at ``MALFORMED_KEEP_BYTES``). An
    envelope that parsed is kept as a JSON object naming why it was refused and, where it has
    them, its delivery tag, task id and task name, beside its (cut) text.
    """
    if isinstance(raw, bytes | str):
        data = raw.encode(errors="backslashreplace") if isinstance(raw, str) else raw
        return data[:MALFORMED_KEEP_BYTES]
    envelope = raw if isinstance(raw, dict) else {}
    properties = envelope.get("properties")
    headers = envelope.get("headers")
    tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
    task_id = headers.get("id") if isinstance(headers, dict) else None
    task = headers.get("task") if isinstance(headers, dict) else None
    text = json.dumps(raw, default=repr)
    return json.dumps({
        "reason": reason,
        "delivery_tag": tag if isinstance(tag, str) else None,
        "id": task_id if isinstance(task_id, str) else None,
        "task": task if isinstance(task, str) else None,
        "at": time.time(),
        "raw": text[:MALFORMED_KEEP_BYTES],
    }).encode()


def keep_malformed(client: Any, raw: Any, reason: str) -> None:
    """Log a refused message and keep it in ``fleet.dead.malformed`` for an operator."""
    entry = malformed_entry(raw, reason)
    log.error("refused a malformed message (%s): %r", reason, entry[:200])
    client.lpush(MALFORMED_QUEUE, entry)


class Transport(kombu_redis.Transport):
    """Kombu's Redis transport with :class:`Channel`."""

    Channel = Channel
    #: The worker's event loop (kombu's hub), once registered with it.
    loop: Any = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        self.loop = loop
        super().register_with_event_loop(connection, loop)


#: The fields kombu's ``Connection.as_uri`` builds a URL from, the transport's name last.
_URI_FIELDS = itemgetter("port", "userid", "password", "virtual_host", "transport")


class Connection(kombu.Connection):
    """A kombu connection whose URL names a Redis broker ``redis://`` (``rediss://`` with TLS).

    Kombu writes the transport's name as the URL's scheme, here the class path
    ``producer.transport:Transport``; Flower picks its queue reader by that scheme and knows
    none by that name. The URL is all that changes: the connection still uses
    :class:`Transport`.
    """

    def as_uri(self, include_password: bool = False, mask: str = "**",
               getfields: Any = None) -> str:
        if getfields is not None or not isinstance(self.transport, kombu_redis.Transport):
            return str(super().as_uri(include_password, mask, getfields or _URI_FIELDS))
        scheme = "rediss" if self.ssl else "redis"  # ssl: broker_use_ssl or the URL's ssl_*

        def fields(info: dict[str, Any]) -> tuple[Any, ...]:
            return (*_URI_FIELDS(info)[:-1], scheme)

        return str(super().as_uri(include_password, mask, fields))
