"""Run the whole benchmark suite: ``python -m benchmarks.run`` (or ``make bench``).

Every system runs alone on the machine, one after the other, on the same prompts and model, in
one run; each figure is the median of ``--reps`` repetitions. Prints a table, writes
``benchmarks/results/latest.json`` and ``benchmarks/results/latest.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks import processes, report
from benchmarks.systems import fleet as fleet_system
from benchmarks.systems import openai_server
from benchmarks.workloads import Workload, prompts, workloads
from producer.localredis import LocalRedis, free_port

FAKE_MODELS = '{"fake": {"model": "fake", "engine": "fake", "max_tokens_cap": 512}}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["direct", "fleet", "openai", "naive", "overhead"])
    args = parser.parse_args()
    with LocalRedis() as redis:
        env = processes.env_with(FLEET_BROKER_URL=redis.url, BENCH_BROKER_URL=redis.url,
                                 FLEET_MODELS=FAKE_MODELS)
        _configure_this_process(env)
        results: dict[str, Any] = {"machine": report.machine(), "reps": args.reps,
                                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        steps = {"direct": bench_direct, "fleet": bench_fleet, "openai": bench_openai,
                 "naive": bench_naive, "overhead": bench_overhead}
        for name, step in steps.items():
            if name not in args.skip:
                print(f"== {name}", flush=True)
                results[name] = step(env, args.reps)
    report.write(results)


def _configure_this_process(env: dict[str, str]) -> None:
    from producer import app
    from producer.celery_app import celery_config
    from producer.settings import get_settings
    from workers.tiny_model import ensure_tiny_model

    os.environ.update({k: v for k, v in env.items() if k.startswith(("FLEET_", "BENCH_"))})
    get_settings.cache_clear()
    app.conf.update(celery_config(get_settings()))
    ensure_tiny_model(get_settings().tiny_model_dir())


def _median(times: list[float]) -> float:
    return statistics.median(times)


def _timed(fn: Any, w: Workload, reps: int, *args: Any) -> list[float]:
    fn(Workload(w.name, w.prompts[:64], w.max_tokens[:64]), *args)  # warm up
    return [fn(w, *args) for _ in range(reps)]


def bench_direct(env: dict[str, str], reps: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.systems.direct", str(reps)],
                         env=env, capture_output=True, text=True, check=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return {"times": data["times"], "rss_bytes": data["rss_bytes"]}


def bench_fleet(env: dict[str, str], reps: int) -> dict[str, Any]:
    from producer.client import wait_for_engine

    worker = processes.fleet_worker("tiny", "bench-1", env)
    try:
        wait_for_engine("tiny", timeout=300)
        batch, delay = {}, {}
        for w in workloads():
            batch[w.name] = _timed(fleet_system.through_batch_helper, w, reps, "tiny")
            delay[w.name] = _timed(fleet_system.through_delay, w, reps, "tiny")
            print(f"   {w.name}: batch {_median(batch[w.name]):.3f}s "
                  f"delay {_median(delay[w.name]):.3f}s", flush=True)
        return {"batch": batch, "delay": delay, "rss_bytes": processes.rss(worker)}
    finally:
        processes.stop(worker)


def bench_openai(env: dict[str, str], reps: int) -> dict[str, Any]:
    from producer.settings import get_settings

    port = free_port()
    server = processes.spawn("openai-server",
                             openai_server.server_argv(get_settings().model("tiny"), port), env)
    try:
        processes.wait_http(f"http://127.0.0.1:{port}/health", server)
        best: dict[str, Any] = {}
        for w in workloads():
            for concurrency in (64, 256, 1024):
                times = _timed(openai_server.run, w, reps, port, concurrency)
                if w.name not in best or _median(times) < _median(best[w.name]["times"]):
                    best[w.name] = {"times": times, "concurrency": concurrency}
            print(f"   {w.name}: {_median(best[w.name]['times']):.3f}s "
                  f"at concurrency {best[w.name]['concurrency']}", flush=True)
        return best
    finally:
        processes.stop(server)


def bench_naive(env: dict[str, str], reps: int, n: int = 64) -> dict[str, Any]:
    from celery.result import ResultSet

    from benchmarks.systems.naive_app import app as naive_app
    from benchmarks.systems.naive_app import generate as naive_generate

    worker = processes.celery_worker("benchmarks.systems.naive_app", "naive", env, "-P", "solo")
    try:
        naive_generate.delay("warm up", 1).get(timeout=300)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            handles = [naive_generate.delay(p, 32) for p in prompts(n)]
            ResultSet(handles).join_native(timeout=600)
            times.append(time.perf_counter() - t0)
        return {"n": n, "max_tokens": 32, "times": times}
    finally:
        naive_app.control.shutdown(destination=["naive@bench"])
        processes.stop(worker)


def bench_overhead(env: dict[str, str], reps: int) -> dict[str, Any]:
    from benchmarks.systems import overhead

    return overhead.measure(env, reps)


if __name__ == "__main__":
    main()
