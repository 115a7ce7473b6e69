"""Celery's Redis result backend, writing each result in one round trip instead of two.

Before it stores a result, Celery reads the stored one (a GET) so that a lost task run twice
never overwrites a SUCCESS; then it writes (SET and PUBLISH in a transaction). That read is a
second Redis round trip for every task, on the worker's path to every answer. This backend does
the same check inside Redis, in one Lua script: the stored value is left alone if it is a
SUCCESS, else the new one is set (with its expiry) and published to the result's channel. One
round trip, and atomic (Celery's read-then-write can still race between two workers).

Selected by the fleet's Celery config (``result_backend``); ``redis://`` and ``rediss://`` URLs
work unchanged. Results are JSON (``result_serializer``), which the script decodes with cjson;
a stored value it cannot decode is overwritten, as Celery's check would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from importlib import resources
from typing import Any, ClassVar

from celery import states
from celery.backends.redis import RedisBackend
from celery.backends.redis import ResultConsumer as RedisResultConsumer
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str
from redis.exceptions import NoScriptError

#: The check-and-store script (``producer/lua/store_unless_success.lua``), read once.
STORE_UNLESS_SUCCESS = (resources.files("producer") / "lua" / "store_unless_success.lua"
                        ).read_text()
STORE_SHA = hashlib.sha1(STORE_UNLESS_SUCCESS.encode()).hexdigest()


class ResultConsumer(RedisResultConsumer):
    """Celery's waiter for results over pub/sub, without its reconnect gap.

    After a lost connection Celery reads the results already stored, then subscribes again:
    a result stored between the two (workers retry their writes the moment Redis is back)
    is published to nobody, and its ``get()`` waits until its timeout. Here the stored
    results are read once more after the subscription is in place.
    """

    def _reconnect_pubsub(self) -> None:
        super()._reconnect_pubsub()
        with self._locked():
            if self.subscribed_to:
                for meta in self.backend.client.mget(self.subscribed_to):
                    if meta:
                        self.on_state_change(self._decode_result(meta), None)


class ResultBackend(RedisBackend):
    """Redis result backend whose result write is one atomic round trip."""

    ResultConsumer = ResultConsumer
    _extended: bool | None = None
    _script_loaded = False
    #: Whether sending a task subscribes this process to its result's channel (Celery's
    #: waiter, for ``AsyncResult.get()``). A process that never calls ``get()`` turns it off
    #: (the gateway waits on its own asyncio connection): nobody would read that connection,
    #: and the results published to it would pile up in Redis until Redis dropped it.
    subscribe_on_send: ClassVar[bool] = True

    def on_task_call(self, producer: Any, task_id: str) -> None:
        if self.subscribe_on_send:
            super().on_task_call(producer, task_id)

    def _store_result(self, task_id: Any, result: Any, state: str, traceback: Any = None,
                      request: Any = None, **kwargs: Any) -> Any:
        meta = self._get_result_meta(result=result, state=state, traceback=traceback,
                                     request=request)
        meta["task_id"] = bytes_to_str(task_id)
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state,
                                    task_id=task_id)
        expires = self.failure_expires if state == states.FAILURE else self.expires
        self.ensure(self._store_all, ([(self.get_key_for_task(task_id), value,
                                        int(expires or 0))], None))
        return result

    def store_many(self, results: list[tuple[str, Any, str, str | None]],
                   then: Callable[[Any], None] | None = None) -> None:
        """Store the results ``(task_id, result, state, traceback)`` of many tasks in one
        pipelined round trip, each with the same check as a single write. ``then`` may add
        commands of its own to the pipeline, after the writes (the same Redis, e.g. the acks
        of those tasks' messages)."""
        writes = []
        done = self.app.now().isoformat()  # the batch finished together
        for task_id, result, state, traceback in results:
            value = self._encoded(task_id, result, state, traceback, done)
            if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
                state, traceback = states.FAILURE, None
                value = self._encoded(task_id, BackendStoreError(
                    "value too large for Redis backend", state=state, task_id=task_id),
                    state, traceback, done)
            expires = self.failure_expires if state == states.FAILURE else self.expires
            writes.append((self.get_key_for_task(task_id), value, int(expires or 0)))
        if writes or then is not None:
            self.ensure(self._store_all, (writes, then))

    def _encoded(self, task_id: str, result: Any, state: str, traceback: str | None,
                 done: str) -> Any:
        if self._extended is None:
            self._extended = bool(self.app.conf.find_value_for_key("extended", "result"))
        if self._extended:  # Celery's own meta, with the request's fields (none here)
            meta = self._get_result_meta(result=self.encode_result(result, state),
                                         state=state, traceback=traceback, request=None)
        else:  # what _get_result_meta returns without a request, without its lookups
            meta = {"status": state, "result": self.encode_result(result, state),
                    "traceback": traceback, "children": [],
                    "date_done": done}
        meta["task_id"] = task_id
        return self.encode(meta)

    def _store_all(self, writes: list[tuple[Any, Any, int]],
                   then: Callable[[Any], None] | None) -> None:
        if not self._script_loaded:  # so that the acks in ``then`` never run without it
            self.client.script_load(STORE_UNLESS_SUCCESS)
            self._script_loaded = True
        for attempt in (1, 2):
            with self.client.pipeline(transaction=False) as pipe:
                for key, value, expires in writes:
                    pipe.execute_command("EVALSHA", STORE_SHA, 1, key, value, expires)
                if then is not None:
                    then(pipe)
                try:
                    pipe.execute()
                    return
                except NoScriptError:  # Redis restarted and lost its scripts: load, redo
                    if attempt == 2:
                        raise
                    self.client.script_load(STORE_UNLESS_SUCCESS)
