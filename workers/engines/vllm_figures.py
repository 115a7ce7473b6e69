"""The figures a vLLM engine reports about its own scheduler, read through vLLM's stat-logger
plug point (``LLMEngine.from_engine_args(stat_loggers=...)``).

vLLM hands every stat logger the scheduler's counts after each engine step (requests running,
waiting, KV cache use); the fleet keeps the latest in :class:`~workers.engines.base.EngineStats`,
so ``fleet engines``, Flower and ``fleet top`` show what runs and waits now. With stat logging
on, vLLM also adds its own Prometheus logger, which records every ``vllm:`` metric in
``prometheus_client``'s registry (served by the worker's ``/metrics``, workers/metrics.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

#: Receives (running, waiting, kv_cache_usage) after each engine step.
Sink = Callable[[int, int, float], None]


class SchedulerFigures(StatLoggerBase):
    """Passes the scheduler's counts of each step to the fleet engine's stats."""

    def __init__(self, vllm_config: Any, engine_index: int = 0, *, sink: Sink) -> None:
        self.sink = sink

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is not None:
            self.sink(scheduler_stats.num_running_reqs,
                      scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs,
                      scheduler_stats.kv_cache_usage)

    def log_engine_initialized(self) -> None:
        pass


def figures_factory(sink: Sink) -> Callable[[Any, int], StatLoggerBase]:
    """A per-engine stat-logger factory (vLLM calls it with its config and engine index)."""
    return lambda vllm_config, engine_index: SchedulerFigures(vllm_config, engine_index,
                                                              sink=sink)
