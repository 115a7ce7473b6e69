"""The engine a worker process holds, and how a task's request reaches it.

One runtime per worker process, built by the worker's bootstep when the worker starts and
looked up by the task bodies with :func:`current`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from producer.errors import EngineFailed, FleetError, InvalidRequest, NoEngine, UnknownModel
from producer.schema import (
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
from workers.engines import Engine, EngineOutput, EngineRequest, build_engine

log = logging.getLogger(__name__)

SAMPLING_FIELDS = set(Sampling.model_fields)
WARMUP_TIMEOUT_S = 600.0


class Runtime:
    """A model's engine inside one worker: load, warm up, serve requests."""

    def __init__(
        self, *, model_id: str, engine_id: str, config: ModelConfig, gpus: list[str]
    ) -> None:
        self.model_id = model_id
        self.engine_id = engine_id
        self.config = config
        self.gpus = gpus
        self.state = "loading"
        self.started_at = time.time()
        self.loads = 0
        self.last_active = time.monotonic()
        self._tp = config.tensor_parallel_size or len(gpus) or 1
        self.engine: Engine = build_engine(model_id, config, tensor_parallel_size=self._tp)
        self._ready = threading.Event()
        self._lock = threading.Lock()  # state and requests in flight
        self._load_lock = threading.Lock()  # one reload at a time
        self._inflight = 0

    def load(self) -> None:
        """Start the engine and answer one warmup request; raise if either fails."""
        t0 = time.monotonic()
        self.engine.start()
        warm = EngineRequest("warmup", {"max_tokens": 1, "temperature": 0.0}, prompt="warm up")
        self.engine.submit([warm])[0].result(timeout=WARMUP_TIMEOUT_S)
        self.loads += 1
        self.last_active = time.monotonic()
        self.state = "ready"
        self._ready.set()
        log.info("engine %s (%s) ready in %.1fs", self.engine_id, self.model_id,
                 time.monotonic() - t0)

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @contextmanager
    def _serving(self) -> Iterator[Engine]:
        """The engine, loaded (reloaded after an idle unload), while a request uses it."""
        with self._lock:
            self._inflight += 1
            unloaded = self.state == "idle-unloaded"
        try:
            if unloaded:
                self._reload()
            elif not self.wait_ready(timeout=WARMUP_TIMEOUT_S):
                raise NoEngine(f"engine {self.engine_id!r} did not become ready")
            yield self.engine
        finally:
            with self._lock:
                self._inflight -= 1
                self.last_active = time.monotonic()

    def _reload(self) -> None:
        with self._load_lock:
            if self.state != "idle-unloaded":
                return
            self.state = "loading"
            try:
                self.engine = build_engine(self.model_id, self.config,
                                           tensor_parallel_size=self._tp)
                self.load()
            except BaseException as e:
                self.state = "failed"
                raise EngineFailed(f"engine {self.engine_id!r} failed to reload: {e}") from e

    def unload_if_idle(self, idle_s: float, queue_depth: Callable[[], int]) -> bool:
        """Release the engine if nothing ran for ``idle_s`` seconds and its queue is empty."""
        with self._lock:
            if (self.state != "ready" or self._inflight
                    or time.monotonic() - self.last_active < idle_s or queue_depth() > 0):
                return False
            self.state = "unloading"
            self._ready.clear()
            self.engine.close()
            self.state = "idle-unloaded"
        log.info("engine %s (%s) unloaded after %.0fs idle", self.engine_id, self.model_id,
                 idle_s)
        return True

    def handle(self, schema: type[GenerateRequest | ChatRequest], task_id: str,
               kwargs: dict[str, Any]) -> dict[str, Any]:
        """Serve one task: validate, apply the model's defaults, generate, build the result."""
        request = self._engine_request(parse(schema, kwargs), task_id)
        with self._serving() as engine:
            return self._completion(engine.submit([request])[0].result(), request)

    def handle_many(self, schema: type[GenerateRequest | ChatRequest], task_id: str,
                    kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        """Serve a many-request: every valid item joins the engine at once; each fails alone."""
        envelope = parse(ManyRequest, kwargs)
        outcomes: list[Any] = []
        valid: list[EngineRequest] = []
        for i, item in enumerate(envelope.requests):
            try:
                request = parse(schema, {**item, "model": envelope.model})
                valid.append(self._engine_request(request, f"{task_id}:{i}"))
                outcomes.append(None)
            except FleetError as e:
                outcomes.append(e)
        with self._serving() as engine:
            futures = iter(zip(valid, engine.submit(valid), strict=True))
            results = []
            for outcome in outcomes:
                if outcome is None:
                    try:
                        sent, future = next(futures)
                        outcome = self._completion(future.result(), sent)
                    except FleetError as e:
                        outcome = e
                results.append(item_result(outcome))
        return results

    def _engine_request(self, request: GenerateRequest | ChatRequest,
                        request_id: str) -> EngineRequest:
        if request.model != self.model_id:
            raise UnknownModel(
                f"model: engine {self.engine_id!r} serves {self.model_id!r}, not {request.model!r}"
            )
        # Tools and JSON output add to what the engine sees: workers/replies.py.
        return replies.engine_request(request, request_id, self._sampling(request), self.config)

    def _completion(self, out: EngineOutput, request: EngineRequest) -> dict[str, Any]:
        completion = {
            "text": out.text,
            "finish_reason": out.finish_reason,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
            "model": self.model_id,
            "engine_id": self.engine_id,
        }
        return replies.finish(completion, out, request, self.config)  # tool calls, JSON

    def _sampling(self, request: Sampling) -> dict[str, Any]:
        defaults = self.config.defaults.model_dump(exclude_none=True)
        given = request.model_dump(include=SAMPLING_FIELDS, exclude_none=True)
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
        answered = self.state == "ready" and self.engine.ping(timeout)
        return {"engine_id": self.engine_id, "model": self.model_id, "state": self.state,
                "ready": bool(answered)}

    def close(self) -> None:
        self.state = "stopped"
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
    """The body of every fleet task in a worker: serve it on this process's engine."""
    runtime = current()
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
