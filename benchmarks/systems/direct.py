"""The ceiling: one ``vllm.LLM.generate()`` call over all prompts, same engine settings.

Run as ``python -m benchmarks.systems.direct``: it loads the engine, warms each workload's
shapes, then serves the benchmark on stdin, one line per request: a workload name runs that
workload once and answers its time; ``single N`` times N sequential one-request calls
(``SINGLE_TOKENS`` tokens each) and answers their latencies; ``rss`` answers the process's
memory. Answers are JSON lines prefixed with ``BENCH`` (vLLM logs to stdout too). Kept resident
so that its repetitions can be interleaved with the fleet's: on a shared, noisy machine both
then meet the same noise.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # as in a fleet worker

PREFIX = "BENCH "
#: Tokens of each request of the single-request latency rounds.
SINGLE_TOKENS = 32


def answer(value: dict[str, Any]) -> None:
    print(PREFIX + json.dumps(value), flush=True)


def main() -> None:
    import psutil
    from vllm import LLM, SamplingParams

    from benchmarks.workloads import workloads
    from producer.settings import get_settings

    cfg = get_settings().model(os.environ.get("BENCH_MODEL", "tiny"))
    optional: dict[str, Any] = {"gpu_memory_utilization": cfg.gpu_memory_utilization}
    llm = LLM(model=cfg.weights, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
              enforce_eager=cfg.enforce_eager, kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
              max_num_seqs=cfg.max_num_seqs, seed=cfg.seed, disable_log_stats=True,
              tensor_parallel_size=cfg.tensor_parallel_size or 1,
              **{k: v for k, v in optional.items() if v is not None})
    runs = {}
    for w in workloads():
        params = [SamplingParams(max_tokens=n, temperature=0.0) for n in w.max_tokens]
        llm.generate(w.prompts[:64], params[:64], use_tqdm=False)  # warm the shapes
        runs[w.name] = (w.prompts, params)
    answer({"ready": True})
    for line in sys.stdin:
        name = line.strip()
        if name == "rss":
            answer({"rss_bytes": psutil.Process().memory_info().rss})
            continue
        if name.startswith("single "):  # sequential one-request calls: their latencies
            single = SamplingParams(max_tokens=SINGLE_TOKENS, temperature=0.0)
            ms = []
            for i in range(int(name.split()[1])):
                t0 = time.perf_counter()
                llm.generate([f"single {i}"], single, use_tqdm=False)
                ms.append((time.perf_counter() - t0) * 1000)
            answer({"ms": ms})
            continue
        prompts, params = runs[name]
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        answer({"time": time.perf_counter() - t0})


class DirectEngine:
    """The benchmark's handle on a resident direct-engine process."""

    def __init__(self, process: Any) -> None:
        self.process = process

    def ask(self, line: str | None = None) -> dict[str, Any]:
        if line is not None:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        for out in self.process.stdout:
            if out.startswith(PREFIX):
                return dict(json.loads(out[len(PREFIX):]))
        raise RuntimeError(f"the direct engine exited ({self.process.wait()})")

    def run(self, name: str) -> float:
        return float(self.ask(name)["time"])


if __name__ == "__main__":
    main()
