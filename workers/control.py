"""Remote-control commands of a fleet worker (``celery -A producer inspect engine``)."""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command, inspect_command

from producer.naming import model_queue
from workers.runtime import Runtime


def _runtime(state: Any) -> Runtime | None:
    """The engine runtime of the worker answering (set by its engine bootstep), if any."""
    return getattr(state.consumer.controller, "runtime", None)


@inspect_command()
def engine(state: Any) -> dict[str, Any] | None:
    """The engine this worker holds: model, state, GPUs and counters (None if no engine)."""
    current = _runtime(state)
    return current.describe() if current is not None else None


@inspect_command(args=[("timeout", float)], signature="[timeout=2.0]")
def engine_health(state: Any, timeout: float = 2.0) -> dict[str, Any]:
    """Whether this worker's engine answers (from the engine thread itself, not the worker)."""
    current = _runtime(state)
    if current is None:
        return {"ready": False, "state": "no engine"}
    return current.health(timeout)


@control_command()
def engine_drain(state: Any) -> dict[str, Any]:
    """Stop taking tasks from the model queue; tasks already taken finish (state: draining)."""
    current = _runtime(state)
    if current is None:
        return {"ok": False, "state": "no engine"}
    current.drain()
    # Control commands run on the consumer's thread, where touching the consumer is safe.
    state.consumer.cancel_task_queue(model_queue(current.model_id))
    return {"ok": True, "state": current.state}
