"""Idle unload: release a resident engine nobody uses, bring it back on the next request.

The worker keeps consuming its model queue meanwhile. How the engine is released is the
model's ``idle_mode``: a full unload (closed, its memory freed, rebuilt on the next request;
the only mode on CPU), or vLLM's sleep mode on a GPU (weights parked in host memory, the KV
cache freed; waking takes seconds instead of a full load).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from workers.runtime import Runtime

log = logging.getLogger(__name__)


class IdleUnloader:
    """A thread that unloads the runtime's engine after ``idle_s`` seconds without work."""

    def __init__(self, runtime: Runtime, idle_s: float, queue_depth: Callable[[], int]) -> None:
        self.runtime = runtime
        self.idle_s = idle_s
        self.queue_depth = queue_depth
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idle-unloader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        interval = min(5.0, max(0.5, self.idle_s / 4))
        while not self._stop.wait(interval):
            try:
                self.runtime.unload_if_idle(self.idle_s, self.queue_depth)
            except Exception:  # never let a Redis hiccup kill the policy thread
                log.exception("idle check failed")
