"""The worker bootstep that loads the engine and subscribes to the model queue once warm.

The worker starts consuming only its engine's own queue. A loader thread builds the engine and
answers a warmup request; only then does the worker add ``fleet.model.<model>`` (through Celery's
own ``add_consumer`` control command, which runs on the consumer's thread), so no task ever
waits on a loading engine. The engine is closed on ``worker_shutdown``, which Celery sends after
the pool has finished the tasks in flight.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import redis
from celery import bootsteps, signals

from producer import naming
from producer.engines import queue_depths
from producer.settings import TINY_MODEL_ID, get_settings
from workers import runtime as runtime_mod
from workers.cpu import request_amx
from workers.delivery import Deliveries
from workers.idle import IdleUnloader
from workers.lease import Lease
from workers.pinning import parse_gpus, pin_gpus
from workers.runtime import Runtime
from workers.tiny_model import ensure_tiny_model

log = logging.getLogger(__name__)


class EngineStep(bootsteps.StartStopStep):
    """Holds the worker's engine for the worker's whole life."""

    label = "Engine"

    def __init__(
        self,
        worker: Any,
        model: str | None = None,
        engine_id: str | None = None,
        gpus: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(worker, **kwargs)
        self.enabled = model is not None
        self.runtime: Runtime | None = None
        self.unloader: IdleUnloader | None = None
        self.lease: Lease | None = None
        self._consumer_ready = threading.Event()
        if not self.enabled or model is None:
            return
        gpu_ids = parse_gpus(gpus)
        pin_gpus(gpu_ids)  # before the engine (and so torch) is even imported
        request_amx()
        settings = get_settings()
        # vLLM reads this when it is first imported, which happens later, on the loader thread.
        multiprocessing = "1" if settings.engine_multiprocessing else "0"
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = multiprocessing
        config = settings.model(model)
        if model == TINY_MODEL_ID and config.model == str(settings.tiny_model_dir()):
            ensure_tiny_model(settings.tiny_model_dir())  # the embedded default builds itself
        self.runtime = Runtime(
            model_id=naming.check_id(model, what="--model"),
            engine_id=engine_id or worker.hostname.split("@", 1)[0],
            config=config,
            gpus=gpu_ids,
            deliveries=Deliveries(max_deliveries=settings.max_deliveries,
                                  ttl_s=settings.result_expires),
            on_failure=lambda reason: self._stop_failed(worker.app, worker.hostname),
        )
        self.lease = Lease(redis.Redis.from_url(settings.broker_url), settings.visibility_timeout)
        runtime_mod.install(self.runtime)
        signals.worker_ready.connect(self._on_consumer_ready, weak=False)
        signals.worker_shutdown.connect(self._on_worker_shutdown, weak=False)

    def start(self, worker: Any) -> None:
        assert self.runtime is not None
        if self.lease is not None:
            self.lease.start()
        loader = threading.Thread(
            target=self._load, args=(worker.app, worker.hostname), name="engine-loader",
            daemon=True,
        )
        loader.start()

    def info(self, worker: Any) -> dict[str, Any]:
        """Merged into ``celery inspect stats``, so Flower's worker page shows the engine."""
        return {"engine": self.runtime.describe()} if self.runtime is not None else {}

    def _stop_failed(self, app: Any, hostname: str) -> None:
        """The engine is gone: stop taking tasks, then exit non-zero (warm shutdown).

        Tasks in flight end at once with EngineFailed and are requeued for other workers.
        """
        if self._consumer_ready.is_set() and self.runtime is not None:
            queue = naming.model_queue(self.runtime.model_id)
            try:
                app.control.cancel_consumer(queue, destination=[hostname], reply=True,
                                            timeout=5)
            except Exception:
                log.exception("could not stop consuming %s", queue)
        os.kill(os.getpid(), signal.SIGTERM)

    def _load(self, app: Any, hostname: str) -> None:
        assert self.runtime is not None
        try:
            self.runtime.load()
        except BaseException as e:
            log.critical("engine %s failed to load; stopping the worker", hostname, exc_info=True)
            self.runtime.fail(f"load failed: {e!r}")
            return
        self._consumer_ready.wait()
        model = self.runtime.model_id
        queue = naming.model_queue(model)
        app.control.add_consumer(queue, destination=[hostname], reply=True, timeout=30)
        log.info("%s consuming %s", hostname, queue)
        idle_s = self.runtime.config.idle_unload_s
        if idle_s:
            self.unloader = IdleUnloader(self.runtime, idle_s,
                                         lambda: queue_depths({model})[model])
            self.unloader.start()

    def _on_consumer_ready(self, **_: Any) -> None:
        self._consumer_ready.set()

    def _on_worker_shutdown(self, sender: Any = None, **_: Any) -> None:
        if self.lease is not None:
            self.lease.stop()
        if self.unloader is not None:
            self.unloader.stop()
        if self.runtime is not None:
            self.runtime.close()
        if self.runtime is not None and self.runtime.failed and sender is not None:
            sender.exitcode = 1
