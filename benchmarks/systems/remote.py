"""The fleet through a remote engine beside an aiohttp client straight to the same server.

vLLM's OpenAI server runs the tiny model with the engine settings of the ``openai`` step. One
fleet worker fronts it (``engine = "openai"``, ``max_in_flight`` at the server's batch size).
Each repetition sends ``N`` chat requests x 32 tokens (``ignore_eos``) three ways, each going
first in turn: the aiohttp client of the ``openai`` step straight to the server (at the
concurrency that serves it best), the fleet through ``.delay()``, and the fleet through the
``chat_batch`` helper. Wall time, and CPU seconds of the server, the worker and this process
(the producer, or the aiohttp client). The worker's resident memory is read after the runs.
"""

from __future__ import annotations

import json
import time
from typing import Any

from celery.result import ResultSet

from benchmarks import processes
from benchmarks.systems import openai_server
from benchmarks.workloads import Workload, prompts

N = 1024
TOKENS = 32
CONCURRENCIES = (256, 1024)
SYSTEMS = ("direct", "delay", "batch")
MODEL = "tiny-remote"


def remote_models(port: int, in_flight: int) -> str:
    return json.dumps({MODEL: {"engine": "openai", "base_url": f"http://127.0.0.1:{port}/v1",
                               "remote_model": "tiny", "max_in_flight": in_flight}})


def through_delay(w: Workload) -> float:
    from producer import chat

    t0 = time.perf_counter()
    handles = [chat.delay([{"role": "user", "content": p}], model=MODEL, max_tokens=n,
                          temperature=0.0, ignore_eos=True)
               for p, n in zip(w.prompts, w.max_tokens, strict=True)]
    values: list[Any] = ResultSet(handles).join_native(timeout=600)
    elapsed = time.perf_counter() - t0
    assert all(v["completion_tokens"] == TOKENS for v in values)
    return elapsed


def through_batch(w: Workload) -> float:
    from producer.client import chat_batch

    t0 = time.perf_counter()
    results = chat_batch([[{"role": "user", "content": p}] for p in w.prompts], model=MODEL,
                         max_tokens=TOKENS, temperature=0.0, ignore_eos=True, timeout=600,
                         progress=False)
    elapsed = time.perf_counter() - t0
    assert all(r.completion_tokens == TOKENS for r in results)
    return elapsed


def _self_cpu_s() -> float:
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system


def measure(env: dict[str, str], reps: int) -> dict[str, Any]:
    from producer.client import wait_for_engine
    from producer.localredis import free_port
    from producer.settings import get_settings

    config = get_settings().model("tiny")
    port = free_port()
    server = processes.spawn("openai-server-remote", openai_server.server_argv(config, port),
                             env)
    worker_env = {**env, "FLEET_MODELS": remote_models(port, config.max_num_seqs or 256)}
    worker = processes.fleet_worker(MODEL, "bench-remote", worker_env)
    w = Workload(f"{N}x{TOKENS} chat", prompts(N), [TOKENS] * N)
    try:
        processes.wait_http(f"http://127.0.0.1:{port}/health", server)
        wait_for_engine(MODEL, timeout=300)
        warm = Workload("warm-up", prompts(64), [TOKENS] * 64)
        concurrency = {c: [openai_server.run_chat(warm, port, c)] for c in CONCURRENCIES}
        through_delay(warm)
        through_batch(warm)
        # The direct client's concurrency: the one that served it best on a first full run.
        for c in CONCURRENCIES:
            concurrency[c].append(openai_server.run_chat(w, port, c))
        best = min(CONCURRENCIES, key=lambda c: concurrency[c][-1])
        runs: dict[str, dict[str, list[float]]] = {
            s: {"times": [], "server_cpu_s": [], "worker_cpu_s": [], "client_cpu_s": []}
            for s in SYSTEMS}
        call = {"direct": lambda: openai_server.run_chat(w, port, best),
                "delay": lambda: through_delay(w), "batch": lambda: through_batch(w)}
        for rep in range(reps):
            order = SYSTEMS[rep % 3:] + SYSTEMS[:rep % 3]  # each goes first in turn
            for system in order:
                cpu0 = (processes.cpu_s(server), processes.cpu_s(worker), _self_cpu_s())
                runs[system]["times"].append(call[system]())
                cpu1 = (processes.cpu_s(server), processes.cpu_s(worker), _self_cpu_s())
                for key, a, b in zip(("server_cpu_s", "worker_cpu_s", "client_cpu_s"),
                                     cpu0, cpu1, strict=True):
                    runs[system][key].append(b - a)
                print(f"   {system}: {runs[system]['times'][-1]:.3f}s", flush=True)
        return {"n": N, "max_tokens": TOKENS, "direct_concurrency": best, "runs": runs,
                "worker_rss_bytes": processes.rss(worker)}
    finally:
        processes.stop(worker)
        processes.stop(server)
