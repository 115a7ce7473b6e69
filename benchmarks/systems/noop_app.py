"""Stock Celery moving no-op tasks on the same Redis: the floor of per-task cost.

Worker: ``celery -A benchmarks.systems.noop_app worker -P solo``.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("noop", broker=os.environ.get("BENCH_BROKER_URL"),
             backend=os.environ.get("BENCH_BROKER_URL"))
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                task_default_queue="noop")


@app.task(name="noop.echo")
def echo(x: int) -> int:
    return x
