"""The engine a worker process holds, and how a task's request reaches it.

One runtime per worker process, built by the worker's bootstep when the worker starts and
looked up by the task bodies with :func:`current`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from producer.errors import InvalidRequest, NoEngine, UnknownModel
from producer.schema import ChatRequest, Completion, GenerateRequest, Sampling, parse
from producer.settings import ModelConfig
from producer.tasks import install_executor
from workers.engines import Engine, EngineRequest, build_engine

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
        self.engine: Engine = build_engine(
            model_id, config, tensor_parallel_size=config.tensor_parallel_size or len(gpus) or 1
        )
        self._ready = threading.Event()

    def load(self) -> None:
        """Start the engine and answer one warmup request; raise if either fails."""
        t0 = time.monotonic()
        self.engine.start()
        warm = EngineRequest("warmup", {"max_tokens": 1, "temperature": 0.0}, prompt="warm up")
        self.engine.submit([warm])[0].result(timeout=WARMUP_TIMEOUT_S)
        self.state = "ready"
        self._ready.set()
        log.info("engine %s (%s) ready in %.1fs", self.engine_id, self.model_id,
                 time.monotonic() - t0)

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def handle(self, schema: type[GenerateRequest | ChatRequest], task_id: str,
               kwargs: dict[str, Any]) -> dict[str, Any]:
        """Serve one task: validate, apply the model's defaults, generate, build the result."""
        request = parse(schema, kwargs)
        if request.model != self.model_id:
            raise UnknownModel(
                f"model: engine {self.engine_id!r} serves {self.model_id!r}, not {request.model!r}"
            )
        if not self.wait_ready(timeout=WARMUP_TIMEOUT_S):
            raise NoEngine(f"engine {self.engine_id!r} did not become ready")
        engine_request = EngineRequest(
            request_id=task_id,
            sampling=self._sampling(request),
            prompt=getattr(request, "prompt", None),
            messages=(
                [m.model_dump() for m in request.messages]
                if isinstance(request, ChatRequest) else None
            ),
        )
        out = self.engine.submit([engine_request])[0].result()
        return Completion(
            text=out.text,
            finish_reason=out.finish_reason,  # type: ignore[arg-type]
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            total_tokens=out.prompt_tokens + out.completion_tokens,
            model=self.model_id,
            engine_id=self.engine_id,
        ).model_dump(mode="json")

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
            "running": stats.running,
            "max_running": stats.max_running,
            "requests_served": stats.requests_served,
            "tokens_generated": stats.tokens_generated,
        }

    def close(self) -> None:
        self.state = "stopped"
        self.engine.close()


_current: Runtime | None = None


def install(runtime: Runtime | None) -> None:
    """Make ``runtime`` the one the task bodies of this process use."""
    global _current
    _current = runtime
    install_executor(execute if runtime is not None else None)


def execute(task: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The body of every fleet task in a worker: serve it on this process's engine."""
    return current().handle(task.schema, task.request.id, kwargs)


def current_or_none() -> Runtime | None:
    return _current


def current() -> Runtime:
    """The runtime of this worker process; NoEngine outside a fleet worker."""
    if _current is None:
        raise NoEngine("this worker holds no engine (start it with `fleet worker --model ...`)")
    return _current
