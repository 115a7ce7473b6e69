"""The lease a live worker keeps on the tasks it holds.

Kombu's Redis transport keeps every delivered, unacknowledged message in a hash and its delivery
time in the sorted set ``unacked_index``; any worker's periodic sweep puts a message whose time is
older than ``visibility_timeout`` back on its queue. That is how a killed worker's tasks come back,
but on its own it also hands a task that simply runs longer than the timeout to a second worker
while the first one still runs it. The lease closes that gap: a thread of each worker moves the
delivery time of every message the worker holds to "now", every quarter of the timeout. A live
worker's tasks therefore never look abandoned, whatever they last, and a dead worker's tasks
come back one ``visibility_timeout`` (plus a sweep) after it stopped renewing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from producer.naming import UNACKED_INDEX_KEY

log = logging.getLogger(__name__)



def held_delivery_tags() -> list[str]:
    """Delivery tags of the messages this worker process holds (reserved or running)."""
    from celery.worker import state

    # list() of a dict's values runs without releasing the GIL: a consistent snapshot even
    # while the consumer thread adds and removes requests.
    return [r.message.delivery_tag for r in list(state.requests.values())]


class Lease(threading.Thread):
    """Renews the visibility of this worker's unacknowledged messages until stopped."""

    def __init__(self, client: Any, visibility_timeout: float,
                 tags: Callable[[], Iterable[str]] = held_delivery_tags) -> None:
        super().__init__(name="lease", daemon=True)
        self.client = client
        self.interval = visibility_timeout / 4
        self.tags = tags
        self._stop_event = threading.Event()

    def renew(self) -> int:
        """Mark every held message as delivered now; returns how many were renewed."""
        tags = list(self.tags())
        if not tags:
            return 0
        now = time.time()
        # XX: only touch entries that still exist; a message acked meanwhile stays gone.
        return int(self.client.zadd(UNACKED_INDEX_KEY, dict.fromkeys(tags, now), xx=True,
                                    ch=True) or 0)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.renew()
            except Exception:  # Redis away (restart, network): renew again next interval
                log.warning("could not renew the lease on held tasks", exc_info=True)

    def stop(self) -> None:
        self._stop_event.set()
