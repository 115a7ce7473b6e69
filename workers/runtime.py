"""The engine a worker process holds, and how a task's request reaches it.

One runtime per worker process, built by the worker's engine bootstep (``workers/bootstep.py``),
which hands it to the micro-batch path (``workers/batcher.py``), to the fleet tasks' bodies
(``ModelTask.executor``) and to the remote-control commands (the worker's ``runtime``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, wait
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from celery.exceptions import Ignore, Reject

from producer.errors import EngineFailed, FleetError, InvalidRequest, NoEngine, UnknownModel
from producer.schema import (
    DEFAULT_MAX_TOKENS,
    SAMPLING_FIELDS,
    ChatRequest,
    GenerateRequest,
    ManyRequest,
    Sampling,
    StatusRequest,
    WarmupRequest,
    parse,
)
from producer.settings import ModelConfig
from producer.tasks import EngineStatusTask, ManyTask, WarmupTask
from workers import replies
from workers.delivery import Deliveries
from workers.engines import Engine, EngineOutput, EngineRequest, build_engine
from workers.replies import Reply
from workers.revoke import RevokeWatcher, is_revoked

log = logging.getLogger(__name__)

WARMUP_TIMEOUT_S = 600.0


class EngineState(StrEnum):
    """Where a worker's engine is in its life; shown as is by ``celery inspect engine``."""

    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"  # takes no new tasks, finishes those taken, then the worker exits
    UNLOADING = "unloading"
    IDLE_UNLOADED = "idle-unloaded"  # released after idle_unload_s; the next task reloads it
    FAILED = "failed"
    STOPPED = "stopped"


class Revoked(Exception):
    """The task was revoked while its requests were in the engine; they were aborted."""


@dataclass(frozen=True, slots=True)
class Work:
    """A serving task's requests for the engine, and how its result is read from their
    outputs once all are done (``answer`` raises the task's error, if it has one)."""

    requests: list[EngineRequest]
    answer: Callable[[Sequence[Future[EngineOutput]]], Any]


def check_revoked(task_id: str, futures: Sequence[Future[EngineOutput]]) -> None:
    """Raise Revoked if the task's requests were aborted because it was revoked."""
    aborted = any(f.exception() is None and f.result().finish_reason == "abort"
                  for f in futures)
    if aborted and is_revoked(task_id):
        raise Revoked(f"task {task_id} was revoked; its requests were aborted")


class Runtime:
    """A model's engine inside one worker: load, warm up, serve requests."""

    def __init__(
        self, *, model_id: str, engine_id: str, config: ModelConfig, gpus: list[str],
        deliveries: Deliveries | None = None,
        on_failure: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.model_id = model_id
        self.engine_id = engine_id
        self.config = config
        self.gpus = gpus
        self.state = EngineState.LOADING
        self.started_at = time.time()
        self.loads = 0
        self.last_active = time.monotonic()
        self._tp = config.tensor_parallel_size or len(gpus) or 1
        #: Called once, on the engine thread, when the engine died or failed to reload: the
        #: worker stops consuming and exits non-zero so its supervisor restarts it.
        self.on_failure = on_failure
        #: Counts deliveries (redelivery and poison checks); None: every delivery runs.
        self.deliveries = deliveries
        self._failed = threading.Event()
        self.revokes = RevokeWatcher()
        self.engine: Engine = self._build()
        self._ready = threading.Event()
        self._lock = threading.Lock()  # state and requests in flight
        self._load_lock = threading.Lock()  # one reload at a time
        self._inflight = 0

    def _build(self) -> Engine:
        return build_engine(self.model_id, self.config, tensor_parallel_size=self._tp,
                            on_death=self._engine_died)

    def _engine_died(self, error: BaseException) -> None:
        self.fail(f"engine died: {error!r}")

    def fail(self, reason: str) -> None:
        """The engine cannot serve any more: report not ready, tell the worker (once)."""
        with self._lock:
            self.state = EngineState.FAILED
            self._ready.clear()
            first = not self._failed.is_set()
            self._failed.set()
        if first:
            log.critical("engine %s (%s) failed: %s", self.engine_id, self.model_id, reason)
            self.on_failure(reason)

    @property
    def failed(self) -> bool:
        return self._failed.is_set()

    def load(self) -> None:
        """Start the engine and answer one warmup request; raise if either fails."""
        t0 = time.monotonic()
        self.engine.start()
        warm = EngineRequest("warmup", {"max_tokens": 1, "temperature": 0.0}, prompt="warm up")
        self.engine.submit([warm])[0].result(timeout=WARMUP_TIMEOUT_S)
        self.loads += 1
        self.last_active = time.monotonic()
        self.state = EngineState.READY
        self._ready.set()
        log.info("engine %s (%s) ready in %.1fs", self.engine_id, self.model_id,
                 time.monotonic() - t0)

    def drain(self) -> None:
        """Mark the engine draining: its worker has stopped taking tasks from the model queue."""
        with self._lock:
            self.state = EngineState.DRAINING

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def serving_now(self) -> bool:
        """Whether a batch can go to the engine without waiting (loaded, warm, not failed)."""
        return self.state in (EngineState.READY, EngineState.DRAINING) and not self.failed

    def acquire(self, count: int = 1) -> Engine:
        """The engine, for ``count`` requests about to use it: reloaded after an idle unload,
        waited for while it loads. Blocks in those two cases; :meth:`release` when done."""
        with self._lock:
            self._inflight += count
            unloaded = self.state == EngineState.IDLE_UNLOADED
        try:
            if unloaded:
                self._reload()
            elif self.failed:
                raise EngineFailed(f"engine {self.engine_id!r} failed; its worker is stopping")
            elif not self.wait_ready(timeout=WARMUP_TIMEOUT_S):
                raise NoEngine(f"engine {self.engine_id!r} did not become ready")
        except BaseException:
            self.release(count)
            raise
        return self.engine

    def release(self, count: int = 1) -> None:
        with self._lock:
            self._inflight -= count
            self.last_active = time.monotonic()

    @contextmanager
    def _serving(self) -> Iterator[Engine]:
        """The engine, loaded (reloaded after an idle unload), while a request uses it."""
        engine = self.acquire()
        try:
            yield engine
        finally:
            self.release()

    def _reload(self) -> None:
        with self._load_lock:
            if self.state != EngineState.IDLE_UNLOADED:
                return
            self.state = EngineState.LOADING
            try:
                self.engine = self._build()
                self.load()
            except BaseException as e:
                self.fail(f"reload failed: {e!r}")
                raise EngineFailed(f"engine {self.engine_id!r} failed to reload: {e}") from e

    def unload_if_idle(self, idle_s: float, queue_depth: Callable[[], int]) -> bool:
        """Release the engine if nothing ran for ``idle_s`` seconds and its queue is empty."""
        with self._lock:
            if (self.state != EngineState.READY or self._inflight
                    or time.monotonic() - self.last_active < idle_s or queue_depth() > 0):
                return False
            self.state = EngineState.UNLOADING
            self._ready.clear()
            self.engine.close()
            self.state = EngineState.IDLE_UNLOADED
        log.info("engine %s (%s) unloaded after %.0fs idle", self.engine_id, self.model_id,
                 idle_s)
        return True

    def prepare(self, task: Any, task_id: str, kwargs: dict[str, Any]) -> Work:
        """A serving task's requests for the engine; raises FleetError if the task is invalid."""
        if isinstance(task, ManyTask):
            return self._prepare_many(task.item_schema, task_id, kwargs)
        return self._prepare_one(task.schema, task_id, kwargs)

    def handle(self, schema: type[GenerateRequest | ChatRequest], task_id: str,
               kwargs: dict[str, Any]) -> dict[str, Any]:
        """Serve one task: validate, apply the model's defaults, generate, build the result."""
        return self._run(task_id, self._prepare_one(schema, task_id, kwargs))

    def handle_many(self, schema: type[GenerateRequest | ChatRequest], task_id: str,
                    kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        """Serve a many-request: every valid item joins the engine at once; each fails alone."""
        return self._run(task_id, self._prepare_many(schema, task_id, kwargs))

    def _prepare_one(self, schema: type[GenerateRequest | ChatRequest], task_id: str,
                     kwargs: dict[str, Any]) -> Work:
        request, reply = self._engine_request(parse(schema, kwargs), task_id)

        def answer(futures: Sequence[Future[EngineOutput]]) -> dict[str, Any]:
            return self._completion(futures[0].result(), request.request_id, reply)

        return Work([request], answer)

    def _prepare_many(self, schema: type[GenerateRequest | ChatRequest], task_id: str,
                      kwargs: dict[str, Any]) -> Work:
        envelope = parse(ManyRequest, kwargs)
        outcomes: list[FleetError | None] = []
        valid: list[EngineRequest] = []
        reading: list[Reply | None] = []
        for i, item in enumerate(envelope.requests):
            try:
                request = parse(schema, {**item, "model": envelope.model})
                sent, reply = self._engine_request(request, f"{task_id}:{i}")
                valid.append(sent)
                reading.append(reply)
                outcomes.append(None)
            except FleetError as e:
                outcomes.append(e)

        def answer(futures: Sequence[Future[EngineOutput]]) -> list[dict[str, Any]]:
            done = iter(zip(valid, reading, futures, strict=True))
            results = []
            for outcome in outcomes:
                result: dict[str, Any] | FleetError | None = outcome
                if result is None:
                    try:
                        sent, reply, future = next(done)
                        result = self._completion(future.result(), sent.request_id, reply)
                    except FleetError as e:
                        result = e
                results.append(item_result(result))
            return results

        return Work(valid, answer)

    def _run(self, task_id: str, work: Work) -> Any:
        with self._serving() as engine:
            futures = engine.submit(work.requests)
            with self.revokes.watching(task_id, engine, [r.request_id for r in work.requests]):
                wait(futures)
            check_revoked(task_id, futures)
            return work.answer(futures)

    def _engine_request(self, request: GenerateRequest | ChatRequest,
                        request_id: str) -> tuple[EngineRequest, Reply | None]:
        if request.model != self.model_id:
            raise UnknownModel(
                f"model: engine {self.engine_id!r} serves {self.model_id!r}, not {request.model!r}"
            )
        # Tools and JSON output add to what the engine sees: workers/replies.py.
        return replies.engine_request(request, request_id, self._sampling(request), self.config)

    def _completion(self, out: EngineOutput, request_id: str,
                    reply: Reply | None) -> dict[str, Any]:
        completion = {
            "text": out.text,
            "finish_reason": out.finish_reason,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
            "model": self.model_id,
            "engine_id": self.engine_id,
        }
        return replies.finish(completion, out, request_id, reply, self.config)  # tools, JSON

    def _sampling(self, request: Sampling) -> dict[str, Any]:
        defaults = self.config.defaults.model_dump(exclude_none=True)
        given = request.model_dump(include=set(SAMPLING_FIELDS), exclude_none=True)
        sampling = {**defaults, **given}
        cap = self.config.max_tokens_cap
        # vLLM's own default when nobody set one, held to the cap like any other value.
        sampling.setdefault("max_tokens", min(DEFAULT_MAX_TOKENS, cap))
        if sampling["max_tokens"] > cap:
            raise InvalidRequest(
                f"max_tokens: {sampling['max_tokens']} is above model {self.model_id!r}'s "
                f"cap of {cap} (max_tokens_cap)"
            )
        return sampling

    def execute(self, task: Any, kwargs: dict[str, Any]) -> Any:
        """The body of a fleet task that takes Celery's ordinary path in this worker (lifecycle
        tasks, a countdown or a canvas; the rest is served in micro-batches by
        :mod:`workers.batcher`), as ``ModelTask.executor``.

        A redelivered task that already has a result, or a poison one, stops at the delivery
        check. A task whose engine died goes back to its queue for another worker (its message
        is requeued, not acknowledged). A revoked one ends REVOKED, as Celery users expect.
        """
        if self.deliveries is not None:
            self.deliveries.admit(task, kwargs)
        try:
            if isinstance(task, WarmupTask):
                return self.warmup(parse(WarmupRequest, kwargs).model)
            if isinstance(task, EngineStatusTask):
                return self.status(parse(StatusRequest, kwargs).engine_id)
            return self._run(task.request.id, self.prepare(task, task.request.id, kwargs))
        except Revoked as e:
            task.backend.mark_as_revoked(task.request.id, reason=str(e), request=task.request)
            raise Ignore() from e
        except EngineFailed as e:
            if not self.failed:
                raise
            if self.deliveries is not None:
                self.deliveries.release(task.request.id, task.backend)
            raise Reject(e, requeue=True) from e

    def describe(self) -> dict[str, Any]:
        """What this engine is and does, for ``celery inspect engine`` and Flower."""
        stats = self.engine.stats()
        return {
            "engine_id": self.engine_id,
            "model": self.model_id,
            "engine": self.config.engine,
            "state": self.state,
            "gpus": self.gpus,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "uptime_s": round(time.time() - self.started_at, 3),
            "loads": self.loads,
            "idle_unload_s": self.config.idle_unload_s,
            "in_flight": self._inflight,
            "running": stats.running,
            "max_running": stats.max_running,
            "requests_served": stats.requests_served,
            "tokens_generated": stats.tokens_generated,
        }

    def warmup(self, model: str) -> dict[str, Any]:
        """Load the engine if it was unloaded; report whether it answers."""
        if model != self.model_id:
            raise UnknownModel(f"model: engine {self.engine_id!r} serves {self.model_id!r}")
        with self._serving():
            pass
        return self.health()

    def status(self, engine_id: str) -> dict[str, Any]:
        if engine_id != self.engine_id:
            raise UnknownModel(f"engine_id: this is engine {self.engine_id!r}, not {engine_id!r}")
        return self.describe()

    def health(self, timeout: float = 2.0) -> dict[str, Any]:
        """Readiness as the engine itself reports it: ready only if warm and answering."""
        answered = self.state == EngineState.READY and self.engine.ping(timeout)
        return {"engine_id": self.engine_id, "model": self.model_id, "state": self.state,
                "ready": bool(answered)}

    def close(self) -> None:
        self.state = EngineState.STOPPED
        self.engine.close()


def item_result(outcome: dict[str, Any] | FleetError) -> dict[str, Any]:
    """One entry of a many-request's result (the shape of ``producer.schema.ItemResult``)."""
    if isinstance(outcome, FleetError):
        return {"error": {"type": type(outcome).__name__, "message": str(outcome)}}
    return {"ok": outcome}
