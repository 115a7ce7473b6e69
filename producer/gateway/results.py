"""Waiting for fleet tasks from asyncio: results over pub/sub, text over streams.

The gateway holds thousands of requests at once, so no thread waits per request. Results come
the way Celery's own waiter gets them (the fleet's result backend publishes each stored result
on the result's key as a channel), over one pub/sub connection for the whole process; a task's
channel is subscribed before its message is sent. A sweep reads the stored results of tasks
that waited a while, so a publish missed across a reconnect costs seconds, not the request.
Streamed text is read with one blocking XREAD per stream (``producer/streams.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from celery import states

from producer.naming import stream_key
from producer.streams import POLL_MS, Following, decode_meta

log = logging.getLogger(__name__)

#: A channel no one publishes on: the pub/sub connection always has a subscription to read.
IDLE_CHANNEL = "fleet.gateway.idle"
#: Seconds between two reads of the stored results of tasks still waiting.
SWEEP_S = 5.0


class Results:
    """Result waiters of one process, on one pub/sub connection."""

    def __init__(self, client: Any, backend: Any) -> None:
        self.client = client  # redis.asyncio.Redis of the result backend
        self.backend = backend  # Celery's result backend: keys and decoding
        self._waiting: dict[str, tuple[asyncio.Future[dict[str, Any]], float]] = {}
        self._pubsub: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        # (Un)subscriptions asked for in one turn of the loop go in one command.
        self._subscribing = Batch(lambda keys: self._pubsub.subscribe(*keys))
        self._unsubscribing = Batch(lambda keys: self._pubsub.unsubscribe(*keys))

    async def start(self) -> None:
        self._pubsub = self.client.pubsub()
        await self._pubsub.subscribe(IDLE_CHANNEL)
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._sweep())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()

    def key(self, task_id: str) -> str:
        return str(self.backend.get_key_for_task(task_id).decode())

    async def expect(self, task_id: str) -> asyncio.Future[dict[str, Any]]:
        """Subscribe to ``task_id``'s result, before its message is sent; the future ends with
        its stored result meta."""
        key = self.key(task_id)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[key] = (future, time.monotonic())
        await self._subscribing.add(key)
        return future

    async def forget(self, task_id: str) -> None:
        """Stop waiting for ``task_id`` (its result arrived, or the caller gave up)."""
        key = self.key(task_id)
        self._waiting.pop(key, None)
        self._unsubscribing.add(key)  # nobody waits for it to be done

    async def stored(self, task_id: str) -> dict[str, Any] | None:
        """The task's stored result meta, if it finished."""
        raw = await self.client.get(self.key(task_id))
        return self._ready(raw)

    def _ready(self, raw: Any) -> dict[str, Any] | None:
        if not raw:
            return None
        meta = decode_meta(raw, self.backend)
        return meta if meta.get("status") in states.READY_STATES else None

    def _resolve(self, key: str, meta: dict[str, Any] | None) -> None:
        if meta is None:
            return
        waiting = self._waiting.pop(key, None)
        if waiting is not None and not waiting[0].done():
            waiting[0].set_result(meta)

    async def _listen(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True,
                                                         timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception:  # the connection dropped: subscribe again, read what was stored
                log.warning("result channel lost; subscribing again", exc_info=True)
                await asyncio.sleep(0.5)
                with contextlib.suppress(Exception):
                    await self._resubscribe()
                continue
            if message is None or message.get("type") != "message":
                continue
            channel = message["channel"]
            key = channel.decode() if isinstance(channel, bytes) else str(channel)
            try:
                self._resolve(key, self._ready(message["data"]))
            except Exception:
                log.exception("unreadable result on %s", key)

    async def _resubscribe(self) -> None:
        keys = list(self._waiting)
        await self._pubsub.subscribe(IDLE_CHANNEL, *keys)
        await self._read_stored(keys)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            old = time.monotonic() - SWEEP_S
            keys = [k for k, (_, since) in list(self._waiting.items()) if since < old]
            with contextlib.suppress(Exception):
                await self._read_stored(keys)

    async def _read_stored(self, keys: list[str]) -> None:
        if keys:
            for key, raw in zip(keys, await self.client.mget(keys), strict=True):
                self._resolve(key, self._ready(raw))


class Batch:
    """Keys added during one turn of the event loop, handed to ``send`` together at the next
    turn (one Redis command for many requests)."""

    def __init__(self, send: Callable[[list[str]], Awaitable[Any]]) -> None:
        self.send = send
        self._keys: list[str] = []
        self._sent: asyncio.Task[None] | None = None

    def add(self, key: str) -> asyncio.Future[None]:
        """Add ``key``; the future ends once the command carrying it is written."""
        self._keys.append(key)
        if self._sent is None:
            self._sent = asyncio.create_task(self._send())
        return asyncio.shield(self._sent)

    async def _send(self) -> None:
        await asyncio.sleep(0)  # the rest of this turn's keys join
        keys, self._keys, self._sent = self._keys, [], None
        try:
            await self.send(keys)
        except Exception:  # the listener subscribes again, and the sweep reads what was stored
            log.warning("could not (un)subscribe %d result channel(s)", len(keys),
                        exc_info=True)


async def follow(client: Any, task_id: str, results: Results) -> AsyncIterator[str]:
    """The pieces of a streaming task's text as they come; ends once its result is stored
    (then read it with ``results.stored``). Raises StreamBroken as :class:`Following` does."""
    key = stream_key(task_id)
    following = Following()
    while True:
        replies = await client.xread({key: following.last_id}, block=POLL_MS)
        pieces, ended = following.feed(replies)
        for piece in pieces:
            yield piece
        if ended:
            return
        if not replies and await results.stored(task_id) is not None:
            return  # it ended without an end mark (e.g. refused before it ran)
