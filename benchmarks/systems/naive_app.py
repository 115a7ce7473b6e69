"""Naive Celery, the pattern most tutorials show: one task calls ``generate()`` on one prompt.

Worker: ``celery -A benchmarks.systems.naive_app worker -P solo`` (the engine lives in the
worker's main process, built when the worker starts).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals

app = Celery("naive", broker=os.environ.get("BENCH_BROKER_URL"),
             backend=os.environ.get("BENCH_BROKER_URL"))
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                worker_prefetch_multiplier=1, task_default_queue="naive")
_llm: Any = None


@signals.worker_init.connect
def _load(**_: Any) -> None:
    global _llm
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    from producer.settings import get_settings
    from workers.cpu import request_amx

    request_amx()
    cfg = get_settings().model("tiny")
    _llm = LLM(model=cfg.weights, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
               enforce_eager=True, kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
               max_num_seqs=cfg.max_num_seqs, seed=cfg.seed)


@app.task(name="naive.generate")
def generate(prompt: str, max_tokens: int) -> dict[str, Any]:
    from vllm import SamplingParams

    out = _llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0),
                        use_tqdm=False)[0]
    return {"text": out.outputs[0].text, "completion_tokens": len(out.outputs[0].token_ids)}
