"""Following a streaming task's text as its worker generates it.

The worker appends the text's pieces to the Redis stream ``fleet.stream.<task_id>`` and, once
the task's result is stored, an end mark (``workers/streams.py``). :class:`Following` reads
those entries, whoever fetches them (the blocking :class:`TextStream` here, the gateway's
asyncio loop); it stops with StreamBroken rather than hand out text that does not continue what
it handed out before (a second run of a redelivered task, entries lost).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from celery import states
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult

from producer.errors import StreamBroken
from producer.naming import stream_key
from producer.schema import Completion

#: How long one blocking read of a stream waits before the reader looks at the result instead
#: (a task that ended without streaming, e.g. refused by its worker before it ran).
POLL_MS = 1_000


class Following:
    """What one reader has taken of a stream: the run it follows, the characters it got."""

    __slots__ = ("last_id", "received", "run")

    def __init__(self) -> None:
        self.run: str | None = None
        self.received = 0
        self.last_id: bytes | str = "0-0"

    def take(self, entry_id: bytes | str, fields: dict[Any, Any]) -> str | None:
        """The text an entry adds; None at the end mark (the result is stored). Raises
        StreamBroken if the entry does not continue the text taken so far."""
        self.last_id = entry_id
        fields = {_text(k): _text(v) for k, v in fields.items()}
        if "end" in fields:
            return None
        run, offset, text = fields.get("a"), int(fields.get("o", -1)), fields.get("t", "")
        if self.run is None:
            self.run = run
        if run != self.run:
            raise StreamBroken("stream: its worker was lost and another one started the text "
                               "again; send the request again")
        if offset != self.received:
            raise StreamBroken(f"stream: entries were lost (expected the text from character "
                               f"{self.received}, got {offset}); send the request again")
        self.received += len(text)
        return text

    def feed(self, replies: Any) -> tuple[list[str], bool]:
        """The text pieces of one ``XREAD`` reply, and whether the end mark came."""
        pieces: list[str] = []
        for _, entries in replies or ():
            for entry_id, fields in entries:
                text = self.take(entry_id, fields)
                if text is None:
                    return pieces, True
                if text:
                    pieces.append(text)
        return pieces, False


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def completion_of(meta: dict[str, Any], backend: Any) -> Completion:
    """A task's Completion from its stored result meta; raises the task's error instead."""
    status = meta.get("status")
    if status == states.SUCCESS:
        return Completion.model_validate(meta["result"], strict=False)
    if status == states.REVOKED:
        raise TaskRevokedError(f"task {meta.get('task_id')} was revoked")
    error = backend.exception_to_python(meta.get("result"))
    raise error if isinstance(error, BaseException) else StreamBroken(str(error))


def decode_meta(raw: bytes | str, backend: Any) -> dict[str, Any]:
    """A stored or published result value, decoded as Celery's backend does."""
    return dict(backend.meta_from_decoded(json.loads(raw)))


class TextStream:
    """The text of one streaming task, piece by piece: iterate for the pieces as they arrive;
    then ``completion`` holds the task's Completion (tool calls, usage, finish reason).

    Leaving a ``with`` block (or :meth:`close`) before the end revokes the task, and its engine
    stops generating.
    """

    def __init__(self, handle: AsyncResult, timeout: float | None = None) -> None:
        self.handle = handle
        self.timeout = timeout
        self.completion: Completion | None = None
        self._client = handle.backend.client

    @property
    def task_id(self) -> str:
        return str(self.handle.id)

    def __iter__(self) -> Iterator[str]:
        key = stream_key(self.task_id)
        following = Following()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            replies = self._client.xread({key: following.last_id}, block=POLL_MS)
            pieces, ended = following.feed(replies)
            yield from pieces
            if ended or (not replies and self.handle.ready()):
                break
            if deadline is not None and time.monotonic() > deadline:
                raise CeleryTimeout(f"task {self.task_id}: no end within {self.timeout}s")
        meta = self.handle.backend.get_task_meta(self.task_id)
        self.completion = completion_of(meta, self.handle.backend)
        if not following.received and self.completion.text:
            # Nothing streamed: the text comes whole (a reply with tool calls is read whole).
            yield self.completion.text

    def close(self) -> None:
        """Revoke the task unless it finished: its engine stops generating."""
        if self.completion is None and not self.handle.ready():
            self.handle.revoke()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
