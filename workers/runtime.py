"""The engine a worker process holds: its life (load, idle unload, reload, failure), its
state and health, and Celery's ordinary path to it for lifecycle tasks.

One runtime per worker process, built by the worker's engine bootstep (``workers/bootstep.py``),
which hands it to the micro-batch path (``workers/batcher.py``), to the fleet tasks' bodies
(``ModelTask.executor``) and to the remote-control commands (the worker's ``runtime``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import wait
from contextlib import contextmanager
from enum import StrEnum
from typing import Any

from celery.exceptions import Ignore, Reject

from producer.errors import EngineFailed, EngineUnreachable, NoEngine, UnknownModel
from producer.schema import (
    ChatRequest,
    GenerateRequest,
    StatusRequest,
    WarmupRequest,
    parse,
)
from producer.settings import ModelConfig
from producer.tasks import EngineStatusTask, WarmupTask
from workers.delivery import Deliveries
from workers.engines import Engine, EngineRequest, build_engine
from workers.revoke import RevokeWatcher
from workers.work import Planner, Revoked, Work, check_revoked

log = logging.getLogger(__name__)

WARMUP_TIMEOUT_S = 600.0


class EngineState(StrEnum):
    """Where a worker's engine is in its life; shown as is by ``celery inspect engine``."""

    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"  # takes no new tasks, finishes those taken, then the worker exits
    UNLOADING = "unloading"
    # Released after idle_unload_s (closed, or asleep: see ModelConfig.idle_mode); the next
    # task brings it back.
    IDLE_UNLOADED = "idle-unloaded"
    # A remote engine whose server does not answer (or refuses the worker's key): the worker
    # does not consume until it answers again.
    UNREACHABLE = "unreachable"
    FAILED = "failed"
    STOPPED = "stopped"


class Runtime:
    """A model's engine inside one worker: load, warm up, serve requests."""

    def __init__(
        self, *, model_id: str, engine_id: str, config: ModelConfig, gpus: list[str],
        deliveries: Deliveries | None = None,
        on_failure: Callable[[str], None] = lambda reason: None,
        stream_opener: Callable[[str], Callable[[str], None]] | None = None,
        log_stats: bool = False,
        on_reachable: Callable[[bool], None] = lambda up: None,
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
        #: Turns serving tasks into engine requests and engine outputs into results.
        self.planner = Planner(model_id, engine_id, config, stream_opener)
        #: Called once, on the engine thread, when the engine died or failed to reload: the
        #: worker stops consuming and exits non-zero so its supervisor restarts it.
        self.on_failure = on_failure
        #: Counts deliveries (redelivery and poison checks); None: every delivery runs.
        self.deliveries = deliveries
        self._failed = threading.Event()
        #: The engine records vLLM's own metrics (the worker serves /metrics).
        self.log_stats = log_stats
        #: Where the worker serves its Prometheus metrics (None: not served).
        self.metrics_url: str | None = None
        #: Tasks this worker ended with an error (counted by its outbox).
        self.tasks_failed = 0
        self.revokes = RevokeWatcher()
        #: Called when a remote engine's server becomes reachable (True: consume the model
        #: queue) or not (False: stop consuming), after the first load.
        self.on_reachable = on_reachable
        #: Why a remote engine's server is unreachable ("" while it answers).
        self.unreachable_reason = ""
        self._reachable = True
        self.engine: Engine = self._build()
        self._ready = threading.Event()
        self._lock = threading.Lock()  # state and requests in flight
        self._load_lock = threading.Lock()  # one reload at a time
        self._inflight = 0

    def _build(self) -> Engine:
        return build_engine(self.model_id, self.config, tensor_parallel_size=self._tp,
                            on_death=self._engine_died, log_stats=self.log_stats,
                            on_reachable=self._reachability)

    def _reachability(self, up: bool, reason: str) -> None:
        """A remote engine's server became reachable or not (on the engine's thread)."""
        with self._lock:
            self._reachable, self.unreachable_reason = up, reason
            if up and self.state == EngineState.UNREACHABLE:
                self.state = EngineState.READY
                self._ready.set()
            elif not up and self.state == EngineState.READY:
                self.state = EngineState.UNREACHABLE
                self._ready.clear()
            else:
                return
        self.on_reachable(up)

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
    def sleeps(self) -> bool:
        """Whether idle unload puts the engine to sleep instead of closing it."""
        return self.config.idle_mode == "sleep"

    @property
    def failed(self) -> bool:
        return self._failed.is_set()

    def load(self, *, wake: bool = False) -> None:
        """Start the engine (or wake it from sleep) and answer one warmup request; raise if
        either fails."""
        t0 = time.monotonic()
        if wake:
            self.engine.wake_up()
        else:
            self.engine.start()
        warm = EngineRequest("warmup", {"max_tokens": 1, "temperature": 0.0}, prompt="warm up")
        try:
            if self._reachable:
                self.engine.submit([warm])[0].result(timeout=WARMUP_TIMEOUT_S)
        except EngineUnreachable:
            pass  # a remote engine's server went away meanwhile: it says when it is back
        self.loads += 1
        self.last_active = time.monotonic()
        with self._lock:
            if not self._reachable:
                self.state = EngineState.UNREACHABLE
                log.warning("engine %s (%s) waits for its server: %s", self.engine_id,
                            self.model_id, self.unreachable_reason)
                return
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
            elif self.state == EngineState.UNREACHABLE:
                raise EngineUnreachable(f"engine {self.engine_id!r} unreachable: "
                                        f"{self.unreachable_reason}")
            elif not self.wait_ready(timeout=WARMUP_TIMEOUT_S):
                raise NoEngine(f"engine {self.engine_id!r} did not become ready")
        except BaseException:
            self.release(count)
            raise
        return self.engine

    @property
    def in_flight(self) -> int:
        """Requests of tasks this worker holds: handed to the engine or about to be."""
        return self._inflight

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
                if self.sleeps:
                    self.load(wake=True)
                else:
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
            if self.sleeps:
                self.engine.sleep()
            else:
                self.engine.close()
            self.state = EngineState.IDLE_UNLOADED
        log.info("engine %s (%s) %s after %.0fs idle", self.engine_id, self.model_id,
                 "put to sleep" if self.sleeps else "unloaded", idle_s)
        return True

    def handle(self, schema: type[GenerateRequest | ChatRequest], task_id: str,
               kwargs: dict[str, Any]) -> dict[str, Any]:
        """Serve one task: validate, apply the model's defaults, generate, build the result."""
        return self._run(task_id, self.planner.prepare_one(schema, task_id, kwargs))

    def handle_many(self, schema: type[GenerateRequest | ChatRequest], task_id: str,
                    kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        """Serve a many-request: every valid item joins the engine at once; each fails alone."""
        return self._run(task_id, self.planner.prepare_many(schema, task_id, kwargs))

    def _run(self, task_id: str, work: Work) -> Any:
        with self._serving() as engine:
            futures = engine.submit(work.requests)
            with self.revokes.watching(task_id, engine, [r.request_id for r in work.requests]):
                wait(futures)
            check_revoked(task_id, futures)
            return work.answer(futures)

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
            return self._run(task.request.id,
                             self.planner.prepare(task, task.request.id, kwargs))
        except Revoked as e:
            task.backend.mark_as_revoked(task.request.id, reason=str(e), request=task.request)
            raise Ignore() from e
        except EngineFailed as e:
            if not (self.failed or isinstance(e, EngineUnreachable)):
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
            "aliases": list(self.config.served_model_name),
            "engine": self.config.engine,
            "state": self.state,
            # Why the state is not ready, where the engine knows (a remote engine's server).
            "reason": self.unreachable_reason or None,
            "base_url": self.config.base_url,
            "gpus": self.gpus,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "uptime_s": round(time.time() - self.started_at, 3),
            "loads": self.loads,
            "idle_unload_s": self.config.idle_unload_s,
            "idle_mode": self.config.idle_mode,
            # The context length the engine runs with (None until it first loaded).
            "max_model_len": getattr(self.engine, "max_model_len", None) or None,
            "in_flight": self._inflight,
            # As the engine's scheduler counts them after its last step.
            "running": stats.running,
            "waiting": stats.waiting,
            # The same by priority (lower is sooner), as the scheduler holds them now.
            "priorities": {str(p): {"running": r, "waiting": w}
                           for p, (r, w) in stats.by_priority.items()},
            "kv_cache_usage": round(stats.kv_cache_usage, 4),
            "max_running": stats.max_running,
            "requests_served": stats.requests_served,
            "tokens_generated": stats.tokens_generated,
            "tasks_failed": self.tasks_failed,
            "metrics_url": self.metrics_url,
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
