"""One task message a worker has taken, from its take to its acknowledgement.

The micro-batch path (:mod:`workers.batcher`) serves a task without Celery's ``Request``, pool
thread or tracer; a job stands in for the request wherever Celery's worker looks at the tasks it
holds: ``celery.worker.state`` (``celery inspect active/reserved``, ``query_task``, the lease in
:mod:`workers.lease`, which reads ``message.delivery_tag``) and ``celery control revoke
--terminate`` (which calls :meth:`Job.terminate`: the job's requests are aborted in the engine).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from producer.naming import GIVEN_BACK_HEADER
from workers.engines import EngineOutput

if TYPE_CHECKING:
    from workers.work import Work


class Job:
    """A taken task message and what serving it needs (Celery's ``Request.info`` shape)."""

    # Celery's worker state keeps held requests in weak sets.
    __slots__ = (
        "__weakref__",
        "acknowledged",
        "args",
        "futures",
        "hostname",
        "id",
        "kwargs",
        "message",
        "name",
        "on_terminate",
        "request_ids",
        "task",
        "time_start",
        "work",
    )

    def __init__(self, message: Any, task: Any, args: list[Any], kwargs: dict[str, Any],
                 hostname: str) -> None:
        self.id: str = message.headers["id"]
        self.name: str = task.name
        self.message = message
        self.task = task
        self.args = args
        self.kwargs = kwargs
        self.hostname = hostname
        self.time_start: float | None = None
        self.futures: list[Future[EngineOutput]] = []
        self.request_ids: list[str] = []
        #: The task's requests and how its result is read (set once validated).
        self.work: Work | None = None
        self.acknowledged = False
        #: Set while the job's requests are in the engine: aborts them.
        self.on_terminate: Callable[[], None] | None = None

    @property
    def redelivered(self) -> bool:
        """Kombu put this message back on its queue once at least (a worker lost it)."""
        return bool(self.message.headers.get("redelivered")
                    or self.message.delivery_info.get("redelivered"))

    @property
    def given_back(self) -> bool:
        """The worker that held it before stopped cleanly and gave it back unrun."""
        return bool(self.message.headers.get(GIVEN_BACK_HEADER))

    @property
    def delivery_info(self) -> dict[str, Any]:
        info = self.message.delivery_info
        return {"exchange": info.get("exchange"), "routing_key": info.get("routing_key"),
                "priority": info.get("priority"), "redelivered": self.redelivered}

    @property
    def worker_pid(self) -> int | None:
        return os.getpid() if self.time_start is not None else None

    def info(self, safe: bool = False) -> dict[str, Any]:
        """What ``celery inspect active/reserved`` and Flower show of a held task."""
        return {"id": self.id, "name": self.name, "args": self.args, "kwargs": self.kwargs,
                "type": self.name, "hostname": self.hostname, "time_start": self.time_start,
                "acknowledged": self.acknowledged, "delivery_info": self.delivery_info,
                "worker_pid": self.worker_pid}

    def humaninfo(self) -> str:
        return f"{self.name}[{self.id}]"

    def start(self) -> None:
        self.time_start = time.time()

    def terminate(self, pool: Any = None, signal: Any = None) -> None:
        """``revoke --terminate``: the job's requests leave the engine at its next step."""
        if self.on_terminate is not None:
            self.on_terminate()

    def __repr__(self) -> str:
        return f"<Job {self.humaninfo()}>"
