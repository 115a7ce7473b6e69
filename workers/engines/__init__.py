"""Engines a worker can hold: ``vllm`` (resident in the worker), ``openai`` (a remote
OpenAI-compatible server), ``fake`` (benchmarks, unit tests)."""

from __future__ import annotations

from collections.abc import Callable

from producer.settings import ModelConfig
from workers.engines.base import Engine, EngineOutput, EngineRequest, EngineStats

__all__ = ["Engine", "EngineOutput", "EngineRequest", "EngineStats", "build_engine"]


def build_engine(
    model_id: str,
    config: ModelConfig,
    *,
    tensor_parallel_size: int,
    on_death: Callable[[BaseException], None] | None = None,
    log_stats: bool = False,
    on_reachable: Callable[[bool, str], None] | None = None,
) -> Engine:
    """The engine named by the model's config (not started yet).

    ``on_death`` is called on the engine's own thread when a started engine dies, before the
    requests it held are failed. ``log_stats``: the engine records its own metrics (vLLM's
    Prometheus metrics) for the worker's ``/metrics``. ``on_reachable``: a remote engine
    reports each time its server becomes reachable or not, with the reason.
    """
    if config.engine == "fake":
        from workers.engines.fake import FakeEngine

        length = config.max_model_len
        return FakeEngine(length if length is not None and length > 0 else 4096)
    if config.engine == "openai":
        from workers.engines.openai import OpenAIEngine

        return OpenAIEngine(model_id, config, on_reachable=on_reachable)
    from workers.engines.vllm import VLLMEngine

    return VLLMEngine(model_id, config, tensor_parallel_size=tensor_parallel_size,
                      on_death=on_death, log_stats=log_stats)
