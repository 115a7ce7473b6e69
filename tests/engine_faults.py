"""Test-only remote-control commands that inject faults into a real worker's real engine.

Loaded into a worker by the tests only (``celery worker --include tests.engine_faults``); the
fleet itself ships no such command. The fault is vLLM's own: the next engine step raises
``vllm.v1.engine.exceptions.EngineDeadError``, as it does when an engine core process dies.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command


@control_command()
def fault_engine_dead(state: Any) -> dict[str, Any]:
    """Make the engine's next step raise EngineDeadError."""
    from vllm.v1.engine.exceptions import EngineDeadError

    llm = state.consumer.controller.runtime.engine._engine

    def dead_step(*args: Any, **kwargs: Any) -> Any:
        raise EngineDeadError("engine core died (injected by the test)")

    llm.step = dead_step
    return {"ok": True}
