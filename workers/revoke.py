"""Revoke for tasks already in the engine.

Celery's ``revoke`` only adds the task id to the worker's revoked set; in a threads pool it
cannot stop a task that already runs. The engine can stop a request, by request id. One thread
per worker looks, every ``interval`` seconds, whether a task whose requests are in the engine
was revoked, and aborts those requests: they leave the running batch at the next engine step
and the task's futures end with finish_reason ``abort``. One thread, rather than every waiting
task polling, so that waiting costs nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from workers.engines import Engine

log = logging.getLogger(__name__)


def is_revoked(task_id: str) -> bool:
    """Whether ``celery revoke`` (or ``AsyncResult.revoke()``) reached this worker for the task."""
    from celery.worker import state

    return task_id in state.revoked


class RevokeWatcher:
    """Aborts, inside the engine, the requests of running tasks that get revoked."""

    def __init__(self, interval: float = 0.1,
                 revoked: Callable[[str], bool] = is_revoked) -> None:
        self.interval = interval
        self.revoked = revoked
        self._watched: dict[str, tuple[Engine, list[str]]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watching(self, task_id: str, engine: Engine, request_ids: list[str]) -> Iterator[None]:
        """While inside, a revoke of ``task_id`` aborts ``request_ids`` in ``engine``."""
        self.watch(task_id, engine, request_ids)
        try:
            yield
        finally:
            self.unwatch(task_id)

    def watch(self, task_id: str, engine: Engine, request_ids: list[str]) -> None:
        """Until :meth:`unwatch`, a revoke of ``task_id`` aborts ``request_ids`` in ``engine``."""
        with self._lock:
            self._watched[task_id] = (engine, request_ids)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="revoke-watcher",
                                                daemon=True)
                self._thread.start()

    def unwatch(self, task_id: str) -> None:
        with self._lock:
            self._watched.pop(task_id, None)

    def _run(self) -> None:
        while True:  # a daemon thread, for the worker's whole life
            time.sleep(self.interval)
            with self._lock:
                watched = list(self._watched.items())
            for task_id, (engine, request_ids) in watched:
                if self.revoked(task_id):
                    with self._lock:
                        still = self._watched.pop(task_id, None)
                    if still is None:  # it left the engine since the snapshot: nothing to stop
                        continue
                    log.info("task %s revoked: aborting %d request(s) in the engine", task_id,
                             len(request_ids))
                    engine.abort(request_ids)
