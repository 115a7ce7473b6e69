"""Serving tasks in micro-batches: every message taken in one fetch reaches the engine at once.

Celery serves a task message through a ``Request``, a pool thread that runs the tracer and then
waits on the engine, its own result write, ack and events. Here the worker's consumer hands
each serving task message (``generate``, ``chat`` and their ``_many`` forms) to a task strategy
of its own, as celery-batches does (:meth:`Batcher.strategy`):

1. On the event loop's thread, each message becomes a :class:`~workers.job.Job`: expired or
   revoked ones end at once, the rest are registered where Celery's worker keeps the tasks it
   holds (``celery inspect active``, the lease) and wait for the end of the loop's turn.
2. At the end of that turn (the transport's take delivers every message of one fetch in the
   same turn), the whole take is admitted together: one Redis round trip checks the
   redelivered ones (stored result, dead-letter count), each task is validated on its own,
   and all valid requests go to the engine in one ``submit``; no thread waits per task.
3. As the engine finishes requests, the :class:`~workers.outbox.Outbox` stores the finished
   tasks' results in one pipelined round trip, then acknowledges them together.

Messages this path does not take (a countdown or ETA, a canvas with callbacks or a chord,
the lifecycle tasks) go through Celery's own strategy and pool, to ``Runtime.execute``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from celery.exceptions import TaskRevokedError
from celery.worker import state as worker_state

from producer.errors import EngineFailed, FleetError
from producer.naming import SENT_AT_HEADER
from producer.tasks import ChatTask, GenerateTask, ManyTask
from workers.delivery import Deliveries
from workers.engines import Engine, EngineOutput
from workers.job import Job
from workers.outbox import Outbox
from workers.runtime import Runtime
from workers.streams import StreamWriter

if TYPE_CHECKING:
    from workers.metrics import WorkerMetrics

log = logging.getLogger(__name__)

#: Embedded-options keys of a canvas: such a message takes Celery's path (its tracer runs them).
CANVAS = ("callbacks", "errbacks", "chain", "chord")

#: Task events buffered before a flush is forced (three per task).
EVENT_BUFFER_LIMIT = 3 * 1024


def batched(task: Any) -> bool:
    """Whether a task's messages are served in micro-batches (the serving tasks)."""
    return isinstance(task, GenerateTask | ChatTask | ManyTask)


class Batcher:
    """Takes serving tasks from the consumer and hands each take to the engine at once."""

    def __init__(self, runtime: Runtime, outbox: Outbox, deliveries: Deliveries | None,
                 hostname: str, streams: StreamWriter | None = None,
                 metrics: WorkerMetrics | None = None) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.outbox = outbox
        self.deliveries = deliveries
        self.hostname = hostname
        self.streams = streams
        self._taken: list[Job] = []
        self._received: list[tuple[Job, str, dict[str, Any]]] = []  # their events
        self._call_soon: Callable[[Callable[[], None]], Any] | None = None
        self._loading = threading.Lock()  # one hand-over at a time waits for a (re)load

    def bind(self, consumer: Any) -> None:
        """Use ``consumer``'s event loop and event dispatcher (again after each reconnect)."""
        hub = consumer.hub
        self._call_soon = hub.call_soon if hub is not None else None
        self.outbox.call_soon = self._call_soon
        dispatcher = consumer.event_dispatcher
        self.outbox.dispatcher = dispatcher if dispatcher and dispatcher.enabled else None
        if dispatcher is not None:
            # Events leave in one message per flush (workers/consumer.py, 5 ms after the first),
            # not every 24 events.
            dispatcher.buffer_limit = max(dispatcher.buffer_limit, EVENT_BUFFER_LIMIT)

    def strategy(self, task: Any, fallback: Any) -> Any:
        """The message handler of ``task`` (Celery's strategy signature); messages it does not
        batch go to ``fallback``, Celery's own strategy."""
        revoked = worker_state.revoked
        outbox = self.outbox
        hostname = self.hostname

        def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any,
                       **kwargs: Any) -> Any:
            headers = message.headers
            args, call, embed = message.payload  # the envelope check decoded it
            if headers.get("eta") or (embed and any(embed.get(k) for k in CANVAS)):
                return fallback(message, body, ack, reject, callbacks, **kwargs)
            job = Job(message, task, args, call, hostname)
            worker_state.task_reserved(job)
            # The reprs the producer wrote, as Celery's own strategy sends them.
            received = (job, "task-received", {
                "name": job.name, "args": headers.get("argsrepr"),
                "kwargs": headers.get("kwargsrepr"), "retries": headers.get("retries", 0),
                "eta": None, "expires": headers.get("expires"),
                "root_id": headers.get("root_id"), "parent_id": headers.get("parent_id")})
            if job.id in revoked or (headers.get("expires") and _expired(headers["expires"])):
                log.info("Discarding revoked task: %s[%s]", job.name, job.id)  # Celery's words
                if self.metrics is not None:
                    self.metrics.taken([headers.get(SENT_AT_HEADER)])
                outbox.events([received])
                return outbox.put(job, TaskRevokedError(
                    "revoked" if job.id in revoked else "expired"))
            self._received.append(received)
            self._taken.append(job)
            if len(self._taken) == 1:
                if self._call_soon is None:
                    self.hand_over()
                else:
                    self._call_soon(self.hand_over)
            return None

        return on_message

    @staticmethod
    def held() -> int:
        """Jobs this worker holds: taken and not yet acknowledged or requeued."""
        return sum(isinstance(r, Job) for r in list(worker_state.requests.values()))

    def hand_over(self) -> None:
        """Admit what was taken in this turn of the loop and give it to the engine at once."""
        jobs, self._taken = self._taken, []
        events, self._received = self._received, []
        if not jobs:
            return
        if self.metrics is not None:
            self.metrics.taken(job.message.headers.get(SENT_AT_HEADER) for job in jobs)
        jobs = self._admit(jobs)
        events += [(job, "task-started", {}) for job in jobs]
        self.outbox.events(events)
        runnable = []
        for job in jobs:
            job.start()
            worker_state.task_accepted(job)
            try:
                work = self.runtime.planner.prepare(job.task, job.id, job.task.named(job.args,
                                                                              job.kwargs))
            except FleetError as e:
                self.outbox.put(job, e)
                continue
            job.work = work
            runnable.append(job)
        if not runnable:
            return
        if self.runtime.serving_now:
            self._submit(self.runtime.acquire(len(runnable)), runnable)
        else:  # loading, or unloaded while idle: wait for it off the event loop's thread
            threading.Thread(target=self._submit_when_ready, args=(runnable,),
                             name="engine-reload", daemon=True).start()

    def _admit(self, jobs: list[Job]) -> list[Job]:
        """The jobs that run; the others end here (already done, dead-lettered, or a stream
        cut off with its worker)."""
        redelivered = [job for job in jobs if job.redelivered]
        if not redelivered:
            return jobs
        if self.metrics is not None:
            self.metrics.redelivered.inc(len(redelivered))
        jobs = self._cut_off_streams(jobs, redelivered)
        redelivered = [job for job in redelivered if job in jobs]
        if self.deliveries is None or not redelivered:
            return jobs
        try:
            verdicts = self.deliveries.check(
                jobs[0].task.backend, [(j.id, j.name, j.kwargs) for j in redelivered],
                {j.id for j in redelivered if j.given_back})
        except Exception:  # Redis away: run them (results stay idempotent), as a first delivery
            log.warning("could not check redelivered tasks", exc_info=True)
            return jobs
        stopped = set()
        for job, verdict in zip(redelivered, verdicts, strict=True):
            if verdict is not None:
                stopped.add(job.id)
                self.outbox.put(job, verdict)
        return [job for job in jobs if job.id not in stopped]

    def _cut_off_streams(self, jobs: list[Job], redelivered: list[Job]) -> list[Job]:
        """A redelivered streaming task whose stream had begun fails instead of running again:
        its reader already holds part of a text that a second run would not continue."""
        streaming = [job for job in redelivered if job.kwargs.get("stream") is True]
        if self.streams is None or not streaming:
            return jobs
        try:
            begun = self.streams.started([job.id for job in streaming])
        except Exception:  # Redis away: the run goes on; its reader sees a new run and stops
            log.warning("could not check the streams of redelivered tasks", exc_info=True)
            return jobs
        cut = {job.id for job, yes in zip(streaming, begun, strict=True) if yes}
        for job in streaming:
            if job.id in cut:
                self.outbox.put(job, EngineFailed(
                    "stream: the worker streaming this task was lost mid-stream; the text "
                    "is not restarted (send the request again)"))
        return [job for job in jobs if job.id not in cut]

    def _submit_when_ready(self, jobs: list[Job]) -> None:
        try:
            with self._loading:
                engine = self.runtime.acquire(len(jobs))
        except FleetError as e:
            for job in jobs:
                self.outbox.put(job, e)
            return
        self._submit(engine, jobs)

    def _submit(self, engine: Engine, jobs: list[Job]) -> None:
        works = [job.work for job in jobs if job.work is not None]
        requests = [r for work in works for r in work.requests]
        try:
            futures = engine.submit(requests) if requests else []
        except Exception as e:  # the engine refused the hand-over as a whole
            self.runtime.release(len(jobs))
            error = e if isinstance(e, FleetError) else EngineFailed(f"engine: {e!r}")
            for job in jobs:
                self.outbox.put(job, error)
            return
        start = 0
        lock = threading.Lock()
        revokes = self.runtime.revokes
        for job, work in zip(jobs, works, strict=True):
            count = len(work.requests)
            job.futures = futures[start:start + count]
            start += count
            job.request_ids = [r.request_id for r in work.requests]
            job.on_terminate = _aborter(engine, job.request_ids)
            if not job.futures:
                self._finished(job)
                continue
            revokes.watch(job.id, engine, job.request_ids)
            left = [count]

            def one_done(_: Future[EngineOutput], job: Job = job, left: list[int] = left
                         ) -> None:
                with lock:
                    left[0] -= 1
                    last = left[0] == 0
                if last:
                    self._finished(job)

            for future in job.futures:
                future.add_done_callback(one_done)

    def _finished(self, job: Job) -> None:
        """The job's requests are all done (on the engine's thread): its result goes out."""
        self.runtime.revokes.unwatch(job.id)
        self.runtime.release()
        self.outbox.put(job)


def _aborter(engine: Engine, request_ids: list[str]) -> Callable[[], None]:
    return lambda: engine.abort(request_ids)


def _expired(expires: Any) -> bool:
    try:
        when = datetime.fromisoformat(str(expires))
    except ValueError:
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when < datetime.now(UTC)

