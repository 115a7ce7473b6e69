"""Where finished micro-batch jobs leave the worker: results, acknowledgements and events together.

One thread of the worker. Each time it wakes it takes every job finished since (an engine step
usually finishes many), builds their results (tool calls and JSON are read here, so the engine's
thread only generates), stores them in one pipelined round trip (``ResultBackend.store_many``,
each write the same check-and-store script as a single one), then drops their unacked records in
one more (``Channel.forget_unacked``). A result is always stored before its message is
acknowledged: a worker killed in between leaves a message whose redelivery finds the result and
is acknowledged without running again (``workers/delivery.py``).

What a job ends as, as Celery's tracer would end it:

- its answer: SUCCESS;
- a FleetError (or any other exception): FAILURE, rebuilt by ``AsyncResult.get()`` as the same
  class;
- revoked before or while it ran (its requests were aborted), or expired: REVOKED;
- already done (a redelivery that found a stored result): acknowledged, nothing stored;
- its engine died: no result; the message goes back to the front of its queue for another
  worker (and its delivery is given back, so it is not counted as a poison message).

Task events (``task-received``, ``-started``, ``-succeeded``, ``-failed``, ``-revoked``) go into
Celery's event buffer, which the consumer flushes a few milliseconds later in one message.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import states
from celery.exceptions import TaskRevokedError
from celery.utils.time import utcoffset
from celery.worker import state as worker_state

from producer.errors import EngineFailed, EngineUnreachable, FleetError
from producer.tasks import short_repr
from workers.delivery import AlreadyDone, Deliveries
from workers.job import Job
from workers.runtime import Runtime
from workers.streams import StreamWriter
from workers.work import Revoked, check_revoked

if TYPE_CHECKING:
    from workers.metrics import WorkerMetrics

log = logging.getLogger(__name__)

class Outbox(threading.Thread):
    """Stores finished jobs' results together, then acknowledges them together."""

    def __init__(self, runtime: Runtime, deliveries: Deliveries | None,
                 streams: StreamWriter | None = None,
                 metrics: WorkerMetrics | None = None) -> None:
        super().__init__(name="outbox", daemon=True)
        self.metrics = metrics
        self.runtime = runtime
        self.deliveries = deliveries
        #: Marks the end of streaming tasks' streams once their results are stored.
        self.streams = streams
        self._done: deque[tuple[Job, BaseException | None]] = deque()
        self._wake = threading.Event()
        self._stopping = False
        #: Celery's task event dispatcher while events are on (``-E``), else None.
        self.dispatcher: Any = None
        #: Runs a callable on the event loop's thread, waking it (the hub's ``call_soon``).
        self.call_soon: Callable[[Callable[[], None]], Any] | None = None

    # --- any thread ---------------------------------------------------------------------------

    def put(self, job: Job, outcome: BaseException | None = None) -> None:
        """``job`` is finished: its requests are done (``outcome`` None), or it ends with
        ``outcome`` without running (an error, a revoke, AlreadyDone)."""
        self._done.append((job, outcome))
        self._wake.set()

    def events(self, events: list[tuple[Job, str, dict[str, Any]]]) -> None:
        """Buffer task events ``(job, type, fields)`` as ``EventDispatcher.send`` would, one
        after the other (each forwards the clock), and ask for one flush for all of them."""
        dispatcher = self.dispatcher
        if (not events or dispatcher is None or not dispatcher.enabled
                or (dispatcher.groups and "task" not in dispatcher.groups)):
            return
        common = {"hostname": dispatcher.hostname, "utcoffset": utcoffset(),
                  "pid": dispatcher.pid, "timestamp": time.time()}
        forward = dispatcher.clock.forward
        buffer = dispatcher._group_buffer["task"]
        for job, kind, fields in events:
            if job.task.send_events:
                buffer.append({**common, **fields, "uuid": job.id, "clock": forward(),
                               "type": kind})
        if len(buffer) >= dispatcher.buffer_limit:
            dispatcher.flush()
        elif dispatcher.on_send_buffered:
            dispatcher.on_send_buffered()

    def stop(self) -> None:
        """Write out what is finished, then end the thread."""
        self._stopping = True
        self._wake.set()
        if self.is_alive():
            self.join()

    # --- the outbox's thread ------------------------------------------------------------------

    def run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            batch = []
            while self._done:
                batch.append(self._done.popleft())
            if batch:
                try:
                    self.finish(batch)
                except Exception:  # never lose the thread
                    log.exception("could not finish %d task(s)", len(batch))
                    self._let_go([job for job, _ in batch])
            elif self._stopping:
                return

    def finish(self, batch: list[tuple[Job, BaseException | None]]) -> None:
        """Store, acknowledge and announce one batch of finished jobs."""
        stored: list[tuple[str, Any, str, str | None]] = []
        acked: list[Job] = []
        requeued: list[Job] = []
        events: list[tuple[Job, str, dict[str, Any]]] = []
        for job, outcome in batch:
            state, value, tb = self._outcome(job, outcome)
            if state is None:
                requeued.append(job)
                continue
            acked.append(job)
            if state == "IGNORED":
                continue
            stored.append((job.id, value, state, tb))
            events.append((job, *_event(job, state, value, tb)))
        self._count(stored, acked)
        self._store_and_acknowledge(stored, acked, requeued)
        if self.streams is not None:
            self.streams.end([job.id for job in acked if job.kwargs.get("stream") is True])
        self.events(events)
        for job in acked + requeued:
            worker_state.task_ready(job)

    def _count(self, stored: list[tuple[str, Any, str, str | None]], acked: list[Job]) -> None:
        """Tasks ended with an error (``fleet engines``) and every end (``/metrics``)."""
        failures = sum(state == states.FAILURE for _, _, state, _ in stored)
        self.runtime.tasks_failed += failures  # this thread is the only writer
        if self.metrics is None:
            return
        now = time.time()
        began = {job.id: job.time_start for job in acked if job.time_start is not None}
        self.metrics.finished(
            (state, type(value).__name__ if state == states.FAILURE else None,
             now - began[task_id] if task_id in began else None)
            for task_id, value, state, _ in stored)

    def _let_go(self, jobs: list[Job]) -> None:
        """Stop holding jobs that could not be finished: the lease no longer renews them and
        their room is free, so their messages, still recorded as unacknowledged in Redis,
        come back after the visibility timeout, for this worker or another."""
        for job in jobs:
            worker_state.task_ready(job)
            try:
                job.message.channel.acked([job.message])
            except Exception:
                log.debug("could not free the room of %s", job.id, exc_info=True)

    def _outcome(self, job: Job, outcome: BaseException | None
                 ) -> tuple[str | None, Any, str | None]:
        """(state, value, traceback) of a finished job; state None: requeue it."""
        try:
            if outcome is not None:
                raise outcome
            check_revoked(job.id, job.futures)
            assert job.work is not None
            return states.SUCCESS, job.work.answer(job.futures), None
        except AlreadyDone:
            return "IGNORED", None, None
        except (Revoked, TaskRevokedError) as e:
            return states.REVOKED, TaskRevokedError(str(e)), None
        except EngineFailed as e:
            # The engine is gone, or a remote engine's server is: another engine serves it.
            if self.runtime.failed or isinstance(e, EngineUnreachable):
                return None, None, None
            return states.FAILURE, e, None
        except FleetError as e:
            return states.FAILURE, e, None
        except Exception as e:
            log.exception("task %s failed", job.id)
            return states.FAILURE, e, traceback.format_exc()

    def _store_and_acknowledge(self, stored: list[tuple[str, Any, str, str | None]],
                               acked: list[Job], requeued: list[Job]) -> None:
        """Store the results, then drop the acked messages' unacked records, in one round trip
        where the broker and the backend are the same Redis; put the requeued messages back in
        front of their queues; then free their room in this process (``Channel.acked``)."""
        acked_by, requeued_by = _by_channel(acked), _by_channel(requeued)
        backend = (acked or requeued)[0].task.backend if (acked or requeued) else None
        shared = {c for c in acked_by if backend is not None and c.shares_redis(backend.client)}

        def acks(pipe: Any) -> None:
            for channel in shared:
                channel.forget_unacked([m.delivery_tag for m in acked_by[channel]], pipe)

        if backend is not None and (stored or shared):
            backend.store_many(stored, then=acks if shared else None)
        for job in requeued:
            if self.deliveries is not None:
                self.deliveries.release(job.id, job.task.backend)
        for channel in acked_by.keys() | requeued_by.keys():
            done, back = acked_by.get(channel, []), requeued_by.get(channel, [])
            try:
                for message in back:
                    channel.qos.restore_by_tag(message.delivery_tag, leftmost=True)
                if channel not in shared:
                    channel.forget_unacked([m.delivery_tag for m in done])
            except Exception:  # the visibility sweep brings them back; results are stored
                log.warning("could not acknowledge %d task(s)", len(done) + len(back),
                            exc_info=True)
                continue
            full = not channel.qos.can_consume()
            channel.acked(done + back)
            if full and self.call_soon is not None:
                # The loop waits for messages only while there is room: wake it to wait again.
                self.call_soon(_nothing)
        for job in acked:
            job.acknowledged = True


def _by_channel(jobs: list[Job]) -> dict[Any, list[Any]]:
    """The jobs' messages, by the channel they came on."""
    out: dict[Any, list[Any]] = {}
    for job in jobs:
        out.setdefault(job.message.channel, []).append(job.message)
    return out


def _nothing() -> None:
    """A callback that only wakes the event loop."""


def _event(job: Job, state: str, value: Any, tb: str | None) -> tuple[str, dict[str, Any]]:
    runtime = time.time() - job.time_start if job.time_start else 0.0
    if state == states.SUCCESS:
        return "task-succeeded", {"result": short_repr(value), "runtime": runtime}
    if state == states.REVOKED:
        return "task-revoked", {"terminated": False, "signum": None,
                                "expired": "expired" in str(value)}
    return "task-failed", {"exception": short_repr(value), "traceback": tb or ""}
