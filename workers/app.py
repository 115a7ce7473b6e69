"""The Celery app as a fleet worker loads it: ``celery -A workers.app worker --model ...``.

Adds to the shared app the worker's command-line options, the engine bootstep (which installs
the task executor) and the remote-control commands. ``fleet worker`` builds this command line.
"""

from __future__ import annotations

from click import Option

from producer.celery_app import app
from workers import control  # noqa: F401 - registers the inspect commands
from workers.bootstep import EngineStep

app.user_options["worker"].add(
    Option(["--model"], default=None, help="Model id this worker's engine serves.")
)
app.user_options["worker"].add(
    Option(["--engine-id"], default=None, help="Engine id (default: the node name's left part).")
)
app.user_options["worker"].add(
    Option(["--gpus"], default=None, help="GPU ids to pin the engine to, e.g. 0,1.")
)
app.steps["worker"].add(EngineStep)
# Task events leave a few ms late and together (workers/consumer.py); a default, so the
# shared app's lazily read settings stay unread until the worker configures itself.
app.add_defaults({"worker_consumer": "workers.consumer:Consumer"})

__all__ = ["app"]
