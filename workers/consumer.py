"""Celery's worker consumer, sending task events a few milliseconds late and together.

Celery buffers task events (received, started, succeeded...) and asks the event loop to flush
the buffer at once each time one is added: from another thread (the outbox, a pool thread)
that wakes the consumer's thread for every event, and the flush (JSON, one Redis PUBLISH)
runs while the task's result is still being written; on a 2-core machine they contend for
the GIL and the cores on every task's path. Here the first buffered event schedules one
flush ``EVENT_FLUSH_DELAY_S`` later and the events added meanwhile ride along: a batch's
events leave in one message after its results are written. Flower shows them that much
later; Celery still flushes at once when the buffer holds ``buffer_limit`` events (raised to
``workers.batcher.EVENT_BUFFER_LIMIT``), and at shutdown.

Messages Celery cannot run as a task end in ``fleet.dead.malformed`` (and in an error result
when they name a task id) rather than only in the log (:mod:`workers.refusals`), and the worker
runs the fleet's own tasks only: a message naming any other task, Celery's built-ins included,
is refused like an unknown one.

Serving tasks are served in micro-batches (:mod:`workers.batcher`) when the worker holds an
engine: their strategy is the batcher's.

Selected by the worker's Celery config (``worker_consumer``, see :mod:`workers.app`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import SecurityError
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.exceptions import ContentDisallowed

from producer.naming import FLEET_TASKS
from workers.batcher import batched
from workers.refusals import envelope_problem, refuse, task_id_of

log = logging.getLogger(__name__)

#: How long the first buffered task event waits for the ones after it.
EVENT_FLUSH_DELAY_S = 0.005


class Consumer(CeleryConsumer):
    """Celery's consumer with task events flushed once per ``EVENT_FLUSH_DELAY_S``."""

    # Set from any thread (under the GIL) when a flush is scheduled; cleared on the loop's
    # thread just before the flush, so an event added during a flush schedules the next one.
    _events_flush_due = False

    def on_send_event_buffered(self) -> None:
        if self.hub is None or self._events_flush_due:
            return
        self._events_flush_due = True
        # call_soon is the hub's only thread-safe entry (the timer heap is not): the loop's
        # thread then sets the timer. From the loop's own thread it wakes nothing.
        self.hub.call_soon(self._schedule_events_flush)

    def _schedule_events_flush(self) -> None:
        self.hub.call_later(EVENT_FLUSH_DELAY_S, self._flush_events_due)

    def _flush_events_due(self) -> None:
        self._events_flush_due = False
        self._flush_events()

    def update_strategies(self) -> None:
        super().update_strategies()
        batcher = getattr(self.controller, "batcher", None)
        if batcher is not None:
            batcher.bind(self)
        for name in list(self.strategies):
            if name not in FLEET_TASKS:
                del self.strategies[name]  # received, it goes to on_unknown_task
                continue
            strategy = self.strategies[name]
            if batcher is not None and batched(self.app.tasks[name]):
                strategy = batcher.strategy(self.app.tasks[name], fallback=strategy)
            self.strategies[name] = self._checked(strategy)

    def _checked(self, strategy: Any) -> Any:
        """``strategy``, behind the checks whose failure Celery meets only in the tracer,
        outside the task's body, where it neither stores a result nor acknowledges."""
        app = self.app

        def check_then_run(message: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
            problem = envelope_problem(message)
            if problem is not None:
                return refuse(app, message, problem)
            return strategy(message, body, *args, **kwargs)

        return check_then_run

    def on_unknown_message(self, body: Any, message: Any) -> None:
        refuse(self.app, message, "not a Celery task message (no task name)")

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        if task_id_of(message) is None:  # Celery would store a result under a null id
            refuse(self.app, message, f"unknown task and no task id: {exc!r}")
        else:  # Celery stores NotRegistered as the task's result
            super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        refuse(self.app, message, f"invalid task message: {exc}",
               trusted=not isinstance(exc, ContentDisallowed | SecurityError))

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        refuse(self.app, message, f"body does not decode: {exc}")

    def shutdown(self) -> None:
        # Task events still waiting for their flush leave before the dispatcher closes.
        if self._events_flush_due and self.event_dispatcher is not None:
            self._events_flush_due = False
            try:
                self.event_dispatcher.flush(errors=False)
            except Exception:
                log.warning("could not send the last task events", exc_info=True)
        super().shutdown()
