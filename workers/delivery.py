"""What a worker checks before it runs a delivered task: redelivery and poison messages.

Delivery is at-least-once (late acks), so a task can arrive again: after its worker was killed,
or after it finished but its worker died before the ack. Kombu marks each message it puts back
on a queue (header ``redelivered``); before such a task runs, one pipelined Redis round trip
counts the redelivery and reads the task's stored result (a first delivery skips all this):

- a result is already stored (success, failure or revoked): the task is not run again, the
  stored result stands and the message is acknowledged (``celery.exceptions.Ignore``);
- the task was delivered more than ``max_deliveries`` times: it killed or lost its worker each
  time (a poison message). It fails with ``DeadLettered`` instead of looping forever, and a copy
  goes to the dead-letter list ``fleet.dead.<model>`` for an operator to inspect or replay.

A task handed back on purpose (its engine died, it is requeued for another worker) gives its
delivery back with :meth:`Deliveries.release`, so it is not counted as poison; one a worker
took and gave back unrun when it stopped cleanly comes back marked so (``GIVEN_BACK_HEADER``,
``producer/transport.py``) and is checked for a stored result without being counted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection
from typing import Any

from celery import states
from celery.exceptions import Ignore

from producer import naming
from producer.errors import DeadLettered
from producer.naming import GIVEN_BACK_HEADER

log = logging.getLogger(__name__)


class AlreadyDone(Exception):
    """The task already has a stored result: it is not run again, its message is acked."""


class Deliveries:
    """Counts the deliveries of each task in the result backend's Redis."""

    def __init__(self, *, max_deliveries: int, ttl_s: int) -> None:
        self.max_deliveries = max_deliveries
        self.ttl_s = ttl_s

    def admit(self, task: Any, kwargs: dict[str, Any]) -> None:
        """Check a task on Celery's ordinary path; raise if it must not run."""
        if not getattr(task.request, "redelivered", False):
            return
        given_back = {task.request.id} if getattr(task.request, GIVEN_BACK_HEADER, False) else set()
        verdict = self.check(task.backend, [(task.request.id, task.name, kwargs)], given_back)[0]
        if isinstance(verdict, AlreadyDone):
            raise Ignore()
        if verdict is not None:
            raise verdict

    def check(self, backend: Any, redelivered: list[tuple[str, str, dict[str, Any]]],
              given_back: Collection[str] = ()) -> list[Exception | None]:
        """Verdicts on redelivered tasks ``(id, name, kwargs)``, in one round trip: None (run
        it), AlreadyDone, or DeadLettered (its copy is then in the dead-letter list).

        A first delivery costs nothing: kombu marks every message it puts back on a queue
        (``redelivered`` header), so only those are checked. The counter holds the number of
        redeliveries; the ids in ``given_back`` (given back unrun by a worker that stopped) are
        not counted.
        """
        if not redelivered:
            return []
        with backend.client.pipeline(transaction=False) as pipe:
            for task_id, _, _ in redelivered:
                key = naming.deliveries_key(task_id)
                count = pipe.get if task_id in given_back else pipe.incr
                count(key).get(backend.get_key_for_task(task_id))
            for task_id, _, _ in redelivered:  # after the reads: their answers stay in pairs
                if task_id not in given_back:
                    pipe.expire(naming.deliveries_key(task_id), self.ttl_s)
            answers = pipe.execute()
        verdicts: list[Exception | None] = []
        for n, (task_id, name, kwargs) in enumerate(redelivered):
            redeliveries, stored = answers[2 * n], answers[2 * n + 1]
            if stored is not None:
                status = backend.decode_result(stored).get("status")
                if status in states.READY_STATES:
                    log.info("task %s already has a %s result; not running it again", task_id,
                             status)
                    verdicts.append(AlreadyDone(task_id))
                    continue
            delivery = 1 + int(redeliveries or 0)
            if delivery > self.max_deliveries:
                self._dead_letter(backend, task_id, name, kwargs, delivery)
                verdicts.append(DeadLettered(
                    f"task {task_id} was dead-lettered after {delivery - 1} deliveries "
                    f"(max_deliveries {self.max_deliveries}): it killed or lost its worker "
                    f"each time"))
                continue
            verdicts.append(None)
        return verdicts

    def release(self, task_id: str, backend: Any) -> None:
        """Give back this delivery: the task is requeued on purpose, not lost with a worker."""
        key = naming.deliveries_key(task_id)
        with backend.client.pipeline(transaction=False) as pipe:
            pipe.decr(key).expire(key, self.ttl_s).execute()

    def _dead_letter(self, backend: Any, task_id: str, name: str, kwargs: dict[str, Any],
                     count: int) -> None:
        model = kwargs.get("model") if isinstance(kwargs.get("model"), str) else "unknown"
        entry = {"id": task_id, "task": name, "kwargs": kwargs, "deliveries": count - 1,
                 "at": time.time()}
        backend.client.lpush(naming.dead_letter_queue(str(model)),
                             json.dumps(entry, default=str))
        log.error("task %s dead-lettered after %d deliveries", task_id, count - 1)
