"""The fleet: a real worker with the real engine, fed through `.delay()` and the batch helper."""

from __future__ import annotations

import time
from typing import Any

from celery.result import ResultSet

from benchmarks.workloads import Workload
from producer import generate
from producer.client import DEFAULT_CHUNK, generate_batch


def through_batch_helper(w: Workload, model: str, chunk_size: int = DEFAULT_CHUNK) -> float:
    items = [{"prompt": p, "max_tokens": n} for p, n in zip(w.prompts, w.max_tokens, strict=True)]
    t0 = time.perf_counter()
    results = generate_batch(items, model=model, temperature=0.0, chunk_size=chunk_size,
                             timeout=600, progress=False)
    elapsed = time.perf_counter() - t0
    _check(w, [r.completion_tokens for r in results])
    return elapsed


def through_delay(w: Workload, model: str) -> float:
    t0 = time.perf_counter()
    handles = [generate.delay(p, model=model, max_tokens=n, temperature=0.0)
               for p, n in zip(w.prompts, w.max_tokens, strict=True)]
    values: list[Any] = ResultSet(handles).join_native(timeout=600)
    elapsed = time.perf_counter() - t0
    _check(w, [v["completion_tokens"] for v in values])
    return elapsed


def _check(w: Workload, counts: list[int]) -> None:
    # Greedy decoding on a random model rarely meets its end token; never count short answers.
    short = sum(1 for got, want in zip(counts, w.max_tokens, strict=True) if got < want)
    if short > len(counts) // 100:
        raise AssertionError(f"{w.name}: {short} answers shorter than asked")
