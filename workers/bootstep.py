"""The worker bootstep that loads the engine and subscribes to the model queue once warm.

The worker starts consuming only its engine's own queue. A loader thread builds the engine and
answers a warmup request; only then does the worker add ``fleet.model.<model>`` (what Celery's
``add_consumer`` control command does, handed straight to the consumer's thread rather than
broadcast: a broadcast sent while the worker's control channel is still subscribing is lost),
so no task ever waits on a loading engine. At a warm shutdown the step waits, once the
consumer has stopped taking tasks, until every task taken has its result stored and its
message acknowledged; the engine is closed on ``worker_shutdown``, which Celery sends after
that (and after its pool has finished the lifecycle tasks it runs).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

import redis
from celery import bootsteps, signals
from celery.exceptions import ImproperlyConfigured

from producer import naming
from producer.engines import queue_depths
from producer.settings import TINY_MODEL_ID, get_settings
from producer.transport import urgent_extra
from workers.batcher import Batcher
from workers.cpu import request_amx
from workers.delivery import Deliveries
from workers.idle import IdleUnloader
from workers.lease import Lease
from workers.outbox import Outbox
from workers.pinning import check_gpu_choice, cuda_build, host_gpus, parse_gpus, pin_gpus
from workers.runtime import EngineState, Runtime
from workers.streams import StreamWriter
from workers.tiny_model import ensure_tiny_model

log = logging.getLogger(__name__)

#: Engine states in which the worker does not consume its model queue.
NOT_CONSUMING = frozenset({EngineState.UNREACHABLE, EngineState.DRAINING, EngineState.FAILED,
                           EngineState.STOPPED})


def vllm_environment(multiprocessing: bool, environ: Mapping[str, str]) -> dict[str, str]:
    """vLLM's process settings for a worker: the engine core in-process unless asked, and
    ``spawn`` for every process vLLM starts (tensor-parallel workers, a separate engine core):
    they start from a process that runs Celery's threads, and fork would copy their locks
    mid-use. An operator's own start method is kept."""
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "1" if multiprocessing else "0",
            "VLLM_WORKER_MULTIPROC_METHOD": environ.get("VLLM_WORKER_MULTIPROC_METHOD", "spawn")}


def choose_gpus(gpus: str | None) -> list[str]:
    """Parse and pin the worker's GPUs before the engine (and so torch) is imported; refuse
    ids that do not parse, a pin that comes too late, and no choice at all on a GPU host."""
    try:
        ids = parse_gpus(gpus)
        if not ids and cuda_build():
            check_gpu_choice(ids, host_gpus(), os.environ, cuda_build=True)
        pin_gpus(ids)
    except (ValueError, RuntimeError) as e:
        raise ImproperlyConfigured(str(e)) from None
    return ids


def refuse_forking_pool(pool_cls: Any) -> None:
    """The engine lives in the worker's own process; a prefork pool (Celery's default) would
    run task bodies in forked children that hold no engine."""
    if getattr(pool_cls, "__module__", "") == "celery.concurrency.prefork":
        raise ImproperlyConfigured(
            "a fleet worker holds its engine in the worker process, and Celery's prefork pool "
            "runs tasks in forked children without it: start it with `fleet worker`, or pass "
            "`-P threads` to `celery -A workers.app worker`")


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
        self.model, self.engine_id, self.gpus = model, engine_id, gpus
        self.runtime: Runtime | None = None
        self.outbox: Outbox | None = None
        self.unloader: IdleUnloader | None = None
        self.lease: Lease | None = None
        self.streams: StreamWriter | None = None
        self._consumer_ready = threading.Event()
        self._loaded = False  # set on the consumer's thread once the first load has ended

    def create(self, worker: Any) -> None:
        """Build the runtime and its collaborators, and give them to the worker: the consumer
        (micro-batches), the fleet tasks' bodies and the remote-control commands."""
        assert self.model is not None
        refuse_forking_pool(worker.pool_cls)
        settings = get_settings()
        config = settings.model(self.model)
        gpu_ids: list[str] = []
        if config.engine != "openai":  # a remote engine's server holds the devices
            gpu_ids = choose_gpus(self.gpus)
            request_amx()
        # vLLM reads these when it is first imported, which happens later, on the loader thread.
        os.environ.update(vllm_environment(settings.engine_multiprocessing, os.environ))
        if (self.model == TINY_MODEL_ID and config.engine == "vllm"
                and config.model == str(settings.tiny_model_dir())):
            ensure_tiny_model(settings.tiny_model_dir())  # the embedded default builds itself
        deliveries = Deliveries(max_deliveries=settings.max_deliveries,
                                ttl_s=settings.result_expires)
        self.streams = streams = StreamWriter(redis.Redis.from_url(settings.backend_url),
                                              settings.stream_ttl_s, settings.stream_interval_s)
        self.runtime = runtime = Runtime(
            model_id=naming.check_model_id(self.model, what="--model"),
            engine_id=self.engine_id or worker.hostname.split("@", 1)[0],
            config=config,
            gpus=gpu_ids,
            deliveries=deliveries,
            on_failure=lambda reason: self._stop_failed(worker),
            stream_opener=streams.opener,
            log_stats=settings.metrics_port is not None,
            on_reachable=lambda up: self._sync_consuming(worker),
        )
        metrics = None
        if settings.metrics_port is not None:
            from workers.metrics import WorkerMetrics

            model = runtime.model_id
            metrics = WorkerMetrics(runtime, lambda: queue_depths({model})[model])
            runtime.metrics_url = metrics.serve(settings.metrics_address, settings.metrics_port)
        self.outbox = Outbox(runtime, deliveries, streams, metrics)
        worker.runtime = runtime
        worker.batcher = Batcher(runtime, self.outbox, deliveries, worker.hostname, streams,
                                 metrics)
        for name in naming.FLEET_TASKS:
            worker.app.tasks[name].executor = runtime.execute
        self.lease = Lease(redis.Redis.from_url(settings.broker_url), settings.visibility_timeout)
        signals.worker_ready.connect(self._on_consumer_ready, weak=False)
        signals.worker_shutdown.connect(self._on_worker_shutdown, weak=False)

    def start(self, worker: Any) -> None:
        assert self.runtime is not None and self.outbox is not None
        self.outbox.start()
        if self.streams is not None:
            self.streams.start()
        if self.lease is not None:
            self.lease.start()
        loader = threading.Thread(
            target=self._load, args=(worker,), name="engine-loader",
            daemon=True,
        )
        loader.start()

    def stop(self, worker: Any) -> None:
        """Warm shutdown (the consumer has stopped taking tasks): finish every job taken, with
        its result stored and its message acknowledged, while the engine still runs."""
        batcher = getattr(worker, "batcher", None)
        if batcher is not None:
            while batcher.held():
                time.sleep(0.05)
        if self.outbox is not None:
            self.outbox.stop()
        if self.streams is not None:
            self.streams.stop()

    def terminate(self, worker: Any) -> None:
        """Cold shutdown: what is held comes back to the queue after the visibility timeout."""

    def info(self, worker: Any) -> dict[str, Any]:
        """Merged into ``celery inspect stats``, so Flower's worker page shows the engine."""
        return {"engine": self.runtime.describe()} if self.runtime is not None else {}

    def _stop_failed(self, worker: Any) -> None:
        """The engine is gone: stop taking tasks, then exit non-zero (warm shutdown).

        Tasks in flight end at once with EngineFailed and are requeued for other workers.
        """
        if self._consumer_ready.is_set() and self.runtime is not None:
            queue = naming.model_queue(self.runtime.model_id)
            try:
                worker.consumer.call_soon(worker.consumer.cancel_task_queue, queue)
            except Exception:
                log.exception("could not stop consuming %s", queue)
        os.kill(os.getpid(), signal.SIGTERM)

    def _load(self, worker: Any) -> None:
        assert self.runtime is not None
        try:
            self.runtime.load()
        except BaseException as e:
            log.critical("engine %s failed to load; stopping the worker", worker.hostname,
                         exc_info=True)
            self.runtime.fail(f"load failed: {e!r}")
            return
        self._consumer_ready.wait()
        model = self.runtime.model_id
        consumer = worker.consumer

        def first() -> None:  # on the consumer's thread, which owns its queues
            # Room for interactive tasks on top of the room for the rest (producer/transport.py).
            consumer.qos.increment_eventually(urgent_extra(consumer.qos.value))
            consumer.qos.update()
            self._loaded = True
            self._sync(worker)

        consumer.call_soon(first)  # the hub runs what it is given in no set order: one call
        idle_s = self.runtime.config.idle_unload_s
        if idle_s:
            self.unloader = IdleUnloader(self.runtime, idle_s,
                                         lambda: queue_depths({model})[model])
            self.unloader.start()

    def _sync_consuming(self, worker: Any) -> None:
        """Consume the model queue while the engine can serve it (:meth:`_sync`), on the
        consumer's thread; called from any thread at each change of a remote engine's server."""
        if self._consumer_ready.is_set():
            try:
                worker.consumer.call_soon(lambda: self._sync(worker))
            except Exception:
                log.exception("could not sync consuming the model queue")

    def _sync(self, worker: Any) -> None:
        """From the end of the first load on, consume the model queue unless a remote engine's
        server is unreachable (then until it is back), or the engine is draining, failed or
        stopped. On the consumer's thread, which owns its queues."""
        runtime, consumer = self.runtime, worker.consumer
        if not self._loaded or runtime is None:
            return  # the loader's own call, after the first load, follows
        queue = naming.model_queue(runtime.model_id)
        want = runtime.state not in NOT_CONSUMING
        consuming = consumer.task_consumer.consuming_from(queue)
        if want and not consuming:
            consumer.add_task_queue(queue)
            log.info("%s consuming %s", worker.hostname, queue)
        elif consuming and not want:
            consumer.cancel_task_queue(queue)
            log.warning("%s stopped consuming %s: engine %s", worker.hostname, queue,
                        runtime.state)

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
