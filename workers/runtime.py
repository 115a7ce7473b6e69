"""The engine a worker process holds, and how a task's request reaches it.

One runtime per worker process, built by the worker's bootstep when the worker starts and
looked up by the task bodies with :func:`current`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, wait
from contextlib import contextmanager
from enum import StrEnum
from typing import Any

from celery.exceptions import Ignore, Reject

from producer.errors import EngineFailed, FleetError, InvalidRequest, NoEngine, UnknownModel
from producer.schema import (
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
from producer.tasks import install_executor
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
        self._revokes = RevokeWatcher()
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

    @contextmanager
    def _serving(self) -> Iterator[Engine]:
        """The engine, loaded (reloaded after an idle unload), while a request uses it."""
        with self._lock:
            self._inflight += 1
            unloaded = self.state == EngineState.IDLE_UNLOADED
        try:
            if unloaded:
                self._reload()
            elif self.failed:
                raise EngineFailed(f"engine {self.engine_id!r} failed; its worker is stopping")
            elif not self.wait_ready(timeout=WARMUP_TIMEOUT_S):
                raise NoEngine(f"engine {self.engine_id!r} did not become ready")
            yield self.engine
        finally:
            with self._lock:
                self._inflight -= 1
                self.last_active = time.monotonic()

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

    def handle(self, schema: type[GenerateRequest | ChatRequest], task_id: str,
               kwargs: dict[str, Any]) -> dict[str, Any]:
        """Serve one task: validate, apply the model's defaults, generate, build the result."""
        request, reply = self._engine_request(parse(schema, kwargs), task_id)
        with self._serving() as engine:
            futures = engine.submit([request])
            self._wait(engine, task_id, futures, [request.request_id])
            return self._completion(futures[0].result(), request.request_id, reply)

    def handle_many(self, schema: type[GenerateRequest | ChatRequest], task_id: str,
                    kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        """Serve a many-request: every valid item joins the engine at once; each fails alone."""
        envelope = parse(ManyRequest, kwargs)
        outcomes: list[Any] = []
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
        with self._serving() as engine:
            submitted = engine.submit(valid)
            self._wait(engine, task_id, submitted, [r.request_id for r in valid])
            futures = iter(zip(valid, reading, submitted, strict=True))
            results = []
            for outcome in outcomes:
                if outcome is None:
                    try:
                        sent, reply, future = next(futures)
                        outcome = self._completion(future.result(), sent.request_id, reply)
                    except FleetError as e:
                        outcome = e
                results.append(item_result(outcome))
        return results

    def _wait(self, engine: Engine, task_id: str, futures: Sequence[Future[EngineOutput]],
              request_ids: list[str]) -> None:
        """Until every future is done; raise Revoked if the task was revoked meanwhile (the
        revoke watcher then aborted its requests in the engine)."""
        with self._revokes.watching(task_id, engine, request_ids):
            wait(futures)
        aborted = any(f.exception() is None and f.result().finish_reason == "abort"
                      for f in futures)
        if aborted and is_revoked(task_id):
            raise Revoked(f"task {task_id} was revoked; its requests were aborted")

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
        if sampling.get("max_tokens", 0) > cap:
            raise InvalidRequest(
                f"max_tokens: {sampling['max_tokens']} is above model {self.model_id!r}'s "
                f"cap of {cap} (max_tokens_cap)"
            )
        return sampling

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


_current: Runtime | None = None


def install(runtime: Runtime | None) -> None:
    """Make ``runtime`` the one the task bodies of this process use."""
    global _current
    _current = runtime
    install_executor(execute if runtime is not None else None)


def item_result(outcome: dict[str, Any] | FleetError) -> dict[str, Any]:
    """One entry of a many-request's result (the shape of ``producer.schema.ItemResult``)."""
    if isinstance(outcome, FleetError):
        return {"error": {"type": type(outcome).__name__, "message": str(outcome)}}
    return {"ok": outcome}


def execute(task: Any, kwargs: dict[str, Any]) -> Any:
    """The body of every fleet task in a worker: serve it on this process's engine.

    A redelivered task that already has a result, or a poison one, stops at the delivery check.
    A task whose engine died goes back to its queue for another worker (its message is
    requeued, not acknowledged). A revoked one ends REVOKED, as Celery users expect.
    """
    runtime = current()
    if runtime.deliveries is not None:
        runtime.deliveries.admit(task, kwargs)
    try:
        return _dispatch(runtime, task, kwargs)
    except Revoked as e:
        task.backend.mark_as_revoked(task.request.id, reason=str(e), request=task.request)
        raise Ignore() from e
    except EngineFailed as e:
        if not runtime.failed:
            raise
        if runtime.deliveries is not None:
            runtime.deliveries.release(task)
        raise Reject(e, requeue=True) from e


def _dispatch(runtime: Runtime, task: Any, kwargs: dict[str, Any]) -> Any:
    if task.action == "serve_many":
        return runtime.handle_many(task.item_schema, task.request.id, kwargs)
    if task.action == "warmup":
        return runtime.warmup(parse(WarmupRequest, kwargs).model)
    if task.action == "status":
        return runtime.status(parse(StatusRequest, kwargs).engine_id)
    return runtime.handle(task.schema, task.request.id, kwargs)


def current_or_none() -> Runtime | None:
    return _current


def current() -> Runtime:
    """The runtime of this worker process; NoEngine outside a fleet worker."""
    if _current is None:
        raise NoEngine("this worker holds no engine (start it with `fleet worker --model ...`)")
    return _current
