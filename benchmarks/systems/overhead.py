"""Pure queue overhead: the fleet with the deterministic fake engine (zero generation cost),
beside stock Celery moving no-op tasks on the same Redis in the same run.

Both workers stay up (the idle one waits on its queue), and their `.delay()` repetitions and
latency rounds alternate, so each pair of figures met the same noise from the shared machine.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from celery.result import ResultSet

from benchmarks import processes
from benchmarks.workloads import Workload, prompts


def measure(env: dict[str, str], reps: int, n_batch: int = 10_000, n_delay: int = 20_000,
            n_latency: int = 300) -> dict[str, Any]:
    from benchmarks.systems import fleet as fleet_system
    from benchmarks.systems.noop_app import app as noop_app
    from benchmarks.systems.noop_app import echo
    from producer.client import generate as generate_one
    from producer.client import wait_for_engine

    out: dict[str, Any] = {"batch_helper_n": n_batch, "delay_n": n_delay, "delay_s": [],
                           "delay_cpu_s": [], "producer_cpu_s": [], "latency_ms": [],
                           "stock": {"delay_n": n_delay, "delay_s": [], "delay_cpu_s": [],
                                     "producer_cpu_s": [], "latency_ms": []}}
    worker = processes.fleet_worker("fake", "fake-1", env)
    stock = processes.celery_worker("benchmarks.systems.noop_app", "noop", env, "-P", "solo")
    try:
        wait_for_engine("fake", timeout=120)
        echo.delay(0).get(timeout=60)
        big = Workload("fake", prompts(n_batch), [1] * n_batch)
        small = Workload("fake", prompts(n_delay), [1] * n_delay)
        out["batch_helper_s"] = [fleet_system.through_batch_helper(big, "fake", 256)
                                 for _ in range(reps)]
        for _ in range(reps):
            # CPU time moves far less with the machine's noise than wall time: the worker's,
            # and this process's (the producer: .delay() and collecting the results).
            cpu0, mine0 = processes.cpu_s(worker), time.process_time()
            out["delay_s"].append(fleet_system.through_delay(small, "fake"))
            out["delay_cpu_s"].append(processes.cpu_s(worker) - cpu0)
            out["producer_cpu_s"].append(time.process_time() - mine0)
            cpu0, mine0 = processes.cpu_s(stock), time.process_time()
            out["stock"]["delay_s"].append(_stock_delay(echo, n_delay))
            out["stock"]["delay_cpu_s"].append(processes.cpu_s(stock) - cpu0)
            out["stock"]["producer_cpu_s"].append(time.process_time() - mine0)
        for _ in range(reps):
            out["latency_ms"].append(latencies(
                lambda i: generate_one(f"ping {i}", model="fake", max_tokens=1, timeout=30),
                n_latency))
            out["stock"]["latency_ms"].append(latencies(
                lambda i: echo.delay(i).get(timeout=30), n_latency))
        out["worker_rss_bytes"] = processes.rss(worker)
    finally:
        noop_app.control.shutdown(destination=["noop@bench"])
        processes.stop(stock)
        processes.stop(worker)
    return out


def _stock_delay(echo: Any, n: int) -> float:
    t0 = time.perf_counter()
    ResultSet([echo.delay(i) for i in range(n)]).join_native(timeout=600)
    return time.perf_counter() - t0


def latencies(call: Any, n: int) -> dict[str, float]:
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        call(i)
        samples.append((time.perf_counter() - t0) * 1000)
    q = statistics.quantiles(samples, n=100)
    return {"p50": statistics.median(samples), "p99": q[98], "mean": statistics.fmean(samples)}


def rounds(measured: list[dict[str, float]]) -> dict[str, float]:
    """The median over latency rounds of each figure (p50, p99, mean)."""
    return {k: statistics.median(r[k] for r in measured) for k in measured[0]}
