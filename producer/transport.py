"""Kombu's Redis transport, hardened against malformed messages on a queue.

Kombu parses each message it pops from a Redis list on the worker's event loop; a body that is
not JSON, not UTF-8, or not shaped like a kombu message raises out of that loop, and the worker
dies ("Unrecoverable error: JSONDecodeError"). Since the message is already popped, it is gone,
and the next worker to start would meet the next such message. This transport refuses such a
message instead: it logs it and keeps its raw bytes in the Redis list ``fleet.dead.malformed``
(no worker consumes it), and the worker goes on. Messages that are well-formed for kombu but not
for Celery (unknown task, pickle content, bad headers) are Celery's to refuse, and it does.

It also keeps one Redis client per channel for the commands kombu sends without one (every
publish, ack and event): kombu builds a new ``redis.Redis`` for each, about 0.3 ms of Python per
message on a 2-core machine, on the producer's and the worker's hot path alike.

Selected by the fleet's Celery config (``broker_transport``); ``redis://`` and ``rediss://`` URLs
work unchanged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Empty

log = logging.getLogger(__name__)

MALFORMED_QUEUE = "fleet.dead.malformed"
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
    _shared: tuple[Any, Any] | None = None  # (connection pool, client on it)

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """The given client, or this channel's own (kombu would build a new one each time).

        A ``redis.Redis`` takes a pooled connection per command, so one client is safe across
        threads; it is rebuilt when kombu replaces the channel's pool (reconnects, forks).
        """
        if client:
            yield client
            return
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

        return super().basic_consume(queue, no_ack, guarded, consumer_tag, **kwargs)

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except ValueError as e:  # JSON, UTF-8, base64 and envelope errors are all ValueErrors
            self._refuse(e)
            raise Empty() from None

    def _refuse(self, error: ValueError) -> None:
        # Each error type keeps what it failed on: that is the raw message.
        raw = getattr(error, "raw", None) or getattr(error, "doc", None) or getattr(
            error, "object", None)
        text = raw if isinstance(raw, str | bytes) else json.dumps(raw, default=repr)
        data = text.encode(errors="backslashreplace") if isinstance(text, str) else text
        log.error("refused a malformed message (%s): %r", error, data[:200])
        try:
            with self.conn_or_acquire() as client:
                client.lpush(MALFORMED_QUEUE, data[:MALFORMED_KEEP_BYTES])
        except Exception:
            log.exception("could not keep the malformed message in %s", MALFORMED_QUEUE)


class Transport(kombu_redis.Transport):
    """Kombu's Redis transport with :class:`Channel`."""

    Channel = Channel
