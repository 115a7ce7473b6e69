"""The ceiling: one ``vllm.LLM.generate()`` call over all prompts, same engine settings.

Run as ``python -m benchmarks.systems.direct REPS``; prints one JSON document.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # as in a fleet worker


def main(reps: int) -> None:
    import psutil
    from vllm import LLM, SamplingParams

    from benchmarks.workloads import workloads
    from producer.settings import get_settings

    settings = get_settings()
    cfg = settings.model("tiny")
    llm = LLM(model=cfg.model, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
              enforce_eager=cfg.enforce_eager, kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
              max_num_seqs=cfg.max_num_seqs, seed=cfg.seed, disable_log_stats=True)
    out: dict[str, list[float]] = {}
    for w in workloads():
        params = [SamplingParams(max_tokens=n, temperature=0.0) for n in w.max_tokens]
        llm.generate(w.prompts[:64], params[:64], use_tqdm=False)  # warm the shapes
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            llm.generate(w.prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        out[w.name] = times
    rss = psutil.Process().memory_info().rss
    print(json.dumps({"times": out, "rss_bytes": rss}))


if __name__ == "__main__":
    main(int(sys.argv[1]))
