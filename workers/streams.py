"""Publishing the text of streaming tasks as it is generated.

A task sent with ``stream=True`` gets a Redis stream, ``fleet.stream.<task_id>``, which its
reader (``producer/streams.py``: the Python client, the gateway) follows. The engine thread hands
each new piece of text to :meth:`StreamWriter.opener`'s callback, which only queues it; the
writer's own thread sends what has queued in one pipelined round trip, pieces of one task that
queued together as one entry. After the task's result is stored, the outbox adds the end mark
(:meth:`StreamWriter.end`), so a reader that sees it finds the result in the backend.

Every entry carries the run that wrote it (``a``, an id drawn per run of the task) and every
delta the length of the text before it (``o``): a reader can tell a second run of a
redelivered task, or a gap, from the text it was following, and stops rather than splice.
Streams are capped in length and expire ``ttl_s`` after their last write.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from producer.naming import stream_key

log = logging.getLogger(__name__)

#: Entries one stream keeps at most (pieces queued together share one entry).
MAX_ENTRIES = 10_000


class StreamWriter(threading.Thread):
    """The worker's one writer of stream entries."""

    def __init__(self, client: Any, ttl_s: int, interval_s: float = 0.0) -> None:
        super().__init__(name="stream-writer", daemon=True)
        self.client = client
        self.ttl_s = ttl_s
        #: Least time between two sends: what queues meanwhile leaves together.
        self.interval_s = interval_s
        # (task id, run, offset, text); text None: the end mark. Appended from any thread.
        self._queued: deque[tuple[str, str, int, str | None]] = deque()
        self._wake = threading.Event()
        self._stopping = False
        # Set when a stream's first piece or an end mark is queued: it does not wait.
        self._urgent = threading.Event()

    def opener(self, task_id: str) -> Callable[[str], None]:
        """A callback that publishes each piece of ``task_id``'s text, for one run of it (the
        engine calls it from one thread, in order)."""
        run = uuid.uuid4().hex[:12]
        queued, wake, urgent = self._queued, self._wake, self._urgent
        sent = [0]

        def on_text(text: str) -> None:
            queued.append((task_id, run, sent[0], text))
            if not sent[0]:
                urgent.set()
            sent[0] += len(text)
            wake.set()

        return on_text

    def end(self, task_ids: Sequence[str]) -> None:
        """The tasks' results are stored: mark their streams' end (after what is queued)."""
        for task_id in task_ids:
            self._queued.append((task_id, "", 0, None))
        if task_ids:
            self._urgent.set()
            self._wake.set()

    def started(self, task_ids: Sequence[str]) -> list[bool]:
        """Whether each task's stream has entries already (an earlier run of it streamed)."""
        with self.client.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.xlen(stream_key(task_id))
            return [bool(n) for n in pipe.execute()]

    def stop(self) -> None:
        """Write out what is queued, then end the thread."""
        self._stopping = True
        self._urgent.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout=10)

    def run(self) -> None:
        last = 0.0
        while True:
            self._wake.wait()
            self._wake.clear()
            # A stream's first piece and an end mark leave at once (a first token or a finished
            # answer is not held); the rest leave once per interval, several engine steps
            # together: fewer entries, reads and events for every reader, and less CPU taken
            # from the engine for each token.
            wait = last + self.interval_s - time.monotonic()
            if wait > 0 and not self._stopping:
                self._urgent.wait(wait)
            self._urgent.clear()
            last = time.monotonic()
            if self._queued:
                try:
                    self.flush()
                except Exception:  # Redis away: readers see a gap or time out, never a splice
                    log.warning("could not publish stream entries", exc_info=True)
            elif self._stopping:
                return

    def flush(self) -> None:
        """Send every queued piece and end mark, in order per task, in one round trip."""
        entries: list[tuple[str, dict[str, str]]] = []
        open_entries: dict[str, dict[str, str]] = {}  # each task's delta entry still growing
        queued = self._queued
        while queued:
            task_id, run, offset, text = queued.popleft()
            if text is None:
                entries.append((task_id, {"end": "1"}))
                open_entries.pop(task_id, None)
                continue
            entry = open_entries.get(task_id)
            if entry is not None and entry["a"] == run:
                entry["t"] += text
            else:
                entry = open_entries[task_id] = {"a": run, "o": str(offset), "t": text}
                entries.append((task_id, entry))
        with self.client.pipeline(transaction=False) as pipe:
            for task_id, fields in entries:
                key = stream_key(task_id)
                pipe.xadd(key, fields, maxlen=MAX_ENTRIES, approximate=True)
                pipe.expire(key, self.ttl_s)
            pipe.execute()
