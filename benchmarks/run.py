"""Run the whole benchmark suite: ``python -m benchmarks.run`` (or ``make bench``).

Every system runs alone on the machine, on the same prompts and model, in one run; each figure
is the median of ``--reps`` repetitions. The direct engine's and the fleet's repetitions are
interleaved (both stay resident), so their ratios compare runs that met the same noise. Prints
a table, writes ``benchmarks/results/latest.json`` and ``benchmarks/results/latest.png``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks import processes, report
from benchmarks.systems import fleet as fleet_system
from benchmarks.systems import openai_server
from benchmarks.systems.direct import SINGLE_TOKENS, DirectEngine
from benchmarks.workloads import Workload, prompts, workloads
from producer.localredis import LocalRedis, free_port

FAKE_MODELS = '{"fake": {"model": "fake", "engine": "fake", "max_tokens_cap": 512}}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    steps_named = ["direct", "fleet", "openai", "gateway", "naive", "overhead", "metrics",
                   "priority", "batch", "remote"]
    parser.add_argument("--skip", nargs="*", default=[], choices=steps_named)
    parser.add_argument("--only", nargs="*", default=[], choices=steps_named,
                        help="run these steps and skip the rest")
    args = parser.parse_args()
    if args.only:
        args.skip = [step for step in steps_named if step not in args.only]
    with LocalRedis() as redis:
        env = processes.env_with(FLEET_BROKER_URL=redis.url, BENCH_BROKER_URL=redis.url,
                                 FLEET_MODELS=FAKE_MODELS)
        configure_this_process(env)
        results: dict[str, Any] = {"machine": report.machine(), "reps": args.reps,
                                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        engines = frozenset({"direct", "fleet"} - set(args.skip))
        if engines:
            print(f"== {' and '.join(sorted(engines))}, interleaved", flush=True)
            results.update(bench_engines(env, args.reps, engines, redis.process))
        steps = {"openai": bench_openai, "gateway": bench_gateway, "naive": bench_naive,
                 "overhead": bench_overhead, "metrics": bench_metrics,
                 "priority": bench_priority, "batch": bench_batch, "remote": bench_remote}
        for name, step in steps.items():
            if name not in args.skip:
                print(f"== {name}", flush=True)
                results[name] = step(env, args.reps)
    report.write(results)


def configure_this_process(env: dict[str, str]) -> None:
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


def bench_engines(env: dict[str, str], reps: int,
                  systems: frozenset[str] = frozenset({"direct", "fleet"}),
                  redis: subprocess.Popen[bytes] | None = None, *, model: str = "tiny",
                  gpus: str = "", names: list[str] | None = None) -> dict[str, Any]:
    """The direct engine and the fleet, their repetitions interleaved workload by workload.

    Both stay resident (the idle one waits on a pipe or a queue, using no CPU), so each pair
    of figures meets the same noise from the shared machine, instead of one system running
    minutes after the other.
    """
    from producer.client import wait_for_engine

    direct: DirectEngine | None = None
    worker: subprocess.Popen[bytes] | None = None
    try:
        if "direct" in systems:
            direct = DirectEngine(subprocess.Popen(
                [sys.executable, "-m", "benchmarks.systems.direct"],
                env={**env, "BENCH_MODEL": model}, text=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE))
            direct.ask()  # loaded and warm
        if "fleet" in systems:
            worker = processes.fleet_worker(model, "bench-1", env, gpus=gpus)
            wait_for_engine(model, timeout=600)
        times: dict[str, dict[str, list[float]]] = {"direct": {}, "batch": {}, "delay": {}}
        # CPU seconds per run of every process on the path: where two cores' time goes.
        cpu: dict[str, dict[str, list[float]]] = {
            "direct": {}, "worker": {}, "producer": {}, "redis": {}}
        for w in [w for w in workloads() if names is None or w.name in names]:
            if worker is not None:  # warm up the fleet's path as the direct engine warmed up
                small = Workload(w.name, w.prompts[:64], w.max_tokens[:64])
                fleet_system.through_batch_helper(small, model)
                fleet_system.through_delay(small, model)
            runs: dict[str, Any] = {}
            if direct is not None:
                runs["direct"] = lambda w=w, direct=direct: _direct_run(direct, w.name, cpu)
            if worker is not None:
                runs["batch"] = lambda w=w: fleet_system.through_batch_helper(w, model)
            for rep in range(reps):
                # Each system of a pair goes first in turn: the second meets whatever state
                # the first left the shared machine in.
                for name in (runs if rep % 2 == 0 else reversed(list(runs))):
                    times[name].setdefault(w.name, []).append(runs[name]())
            # Apart from the pairs: after a .delay() run (seconds of load on both cores) the
            # direct engine's next 1024 x 1 took 0.66-1.2 s, after a batch-helper run 0.51 s.
            if worker is not None:
                procs = {"worker": worker, "redis": redis}
                for _ in range(reps):
                    cpu0 = _cpu(procs)
                    times["delay"].setdefault(w.name, []).append(
                        fleet_system.through_delay(w, model))
                    for who, used in _cpu(procs).items():
                        cpu[who].setdefault(w.name, []).append(used - cpu0[who])
            print("   " + w.name + ": " + ", ".join(
                f"{system} {_median(t[w.name]):.3f}s" for system, t in times.items()
                if w.name in t), flush=True)
        out: dict[str, Any] = {}
        single = single_latencies(direct, reps, model) if direct and worker else None
        if direct is not None:
            out["direct"] = {"times": times["direct"], "cpu_s": cpu["direct"],
                             "rss_bytes": direct.ask("rss")["rss_bytes"]}
        if worker is not None:
            out["fleet"] = {"batch": times["batch"], "delay": times["delay"],
                            "delay_cpu_s": cpu["worker"], "single_ms": single,
                            "delay_producer_cpu_s": cpu["producer"],
                            "delay_redis_cpu_s": cpu["redis"],
                            "rss_bytes": processes.rss(worker)}
        return out
    finally:
        if worker is not None:
            processes.stop(worker)
        if direct is not None:
            direct.process.stdin.close()
            direct.process.wait(60)


def _direct_run(direct: DirectEngine, name: str, cpu: dict[str, dict[str, list[float]]]) -> float:
    cpu0 = processes.cpu_s(direct.process)
    elapsed = direct.run(name)
    cpu["direct"].setdefault(name, []).append(processes.cpu_s(direct.process) - cpu0)
    return elapsed


def _cpu(procs: dict[str, Any]) -> dict[str, float]:
    """CPU seconds so far of each process, and of this one: the producer."""
    used = {who: processes.cpu_s(p) for who, p in procs.items() if p is not None}
    used["producer"] = time.process_time()
    return used


def single_latencies(direct: DirectEngine, reps: int, model: str = "tiny",
                     calls: int = 30) -> dict[str, Any]:
    """One request at a time (32 tokens), the direct engine and the fleet's
    ``.delay().get()`` in alternating rounds of ``calls``: the latency the fleet adds."""
    from producer.client import generate as generate_one

    out: dict[str, list[float]] = {"direct": [], "fleet": []}
    for _ in range(max(reps, 2)):
        out["direct"] += direct.ask(f"single {calls}")["ms"]
        for i in range(calls):
            t0 = time.perf_counter()
            generate_one(f"single {i}", model=model, max_tokens=SINGLE_TOKENS,
                         temperature=0.0, timeout=60)
            out["fleet"].append((time.perf_counter() - t0) * 1000)
    return out


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


GATEWAY_CONCURRENCIES = (64, 256, 1024)
#: The processes whose CPU a system's requests cost: the gateway and the worker, or the server
#: with its engine's processes.
GATEWAY_METERS = {"gateway": ("gateway", "worker"), "server": ("server",)}


def bench_gateway(env: dict[str, str], reps: int, *, n: int = 1024,
                  first_tokens: int = 20) -> dict[str, Any]:
    """The fleet behind its OpenAI gateway against vLLM's OpenAI server, both resident, their
    repetitions interleaved: non-streaming chat throughput, time to first token, one stream's
    token rate, and how soon a client's disconnect frees the fleet's engine."""
    from benchmarks.systems import gateway
    from producer.client import wait_for_engine
    from producer.engines import list_engines
    from producer.settings import get_settings

    ports = {"gateway": free_port(), "server": free_port()}
    procs = {
        "server": processes.spawn("openai-server-chat", openai_server.server_argv(
            get_settings().model("tiny"), ports["server"]), env),
        "worker": processes.fleet_worker("tiny", "bench-gw", env),
        "gateway": processes.spawn("gateway", [
            sys.executable, "-m", "producer.cli", "gateway", "--port", str(ports["gateway"]),
            "--insecure", "--loglevel", "warning"], env),
    }
    try:
        processes.wait_http(f"http://127.0.0.1:{ports['server']}/health", procs["server"])
        wait_for_engine("tiny", timeout=600)
        processes.wait_http(f"http://127.0.0.1:{ports['gateway']}/health?model=tiny",
                            procs["gateway"])
        node = next(e["node"] for e in list_engines("tiny") if e["engine_id"] == "bench-gw")
        for system in GATEWAY_METERS:  # warm up both paths, streaming included
            openai_server.run_chat(Workload("warm-up", prompts(64), [32] * 64), ports[system], 64)
            gateway.first_token_ms(ports[system], prompts(2))
        out = {"throughput": _chat_throughput(ports, procs, reps, n)}
        print("   chat: " + ", ".join(
            f"{system} {_median(runs['times']):.3f}s at concurrency {c}"
            for system, (c, runs) in report.best_concurrency(out["throughput"]).items()),
            flush=True)
        long_prompt = min(prompts(16), key=len)  # 400 tokens and the prompt fit the context
        first_ms: dict[str, list[float]] = {system: [] for system in GATEWAY_METERS}
        rate: dict[str, list[float]] = {system: [] for system in GATEWAY_METERS}
        disconnect: dict[str, list[Any]] = {"ms": [], "aborted": []}
        for rep in range(reps):
            for system in _turns(rep):
                first_ms[system] += gateway.first_token_ms(
                    ports[system], prompts(first_tokens, seed=100 + rep))
                rate[system].append(gateway.tokens_per_s(ports[system], long_prompt))
            for key, value in gateway.disconnect_ms(ports["gateway"], node, long_prompt).items():
                disconnect[key].append(value)
        out.update(first_token_ms=first_ms, tokens_per_s=rate, disconnect=disconnect)
        print("\n".join("   " + row for row in report.rows(report.gateway(out))), flush=True)
        return out
    finally:
        for process in procs.values():
            processes.stop(process)


def _turns(rep: int) -> list[str]:
    """The systems in the order of repetition ``rep``: each goes first in turn."""
    return list(GATEWAY_METERS) if rep % 2 == 0 else list(reversed(GATEWAY_METERS))


def _chat_throughput(ports: dict[str, int], procs: dict[str, subprocess.Popen[bytes]],
                     reps: int, n: int) -> dict[str, Any]:
    """Wall and CPU seconds of n non-streaming 32-token chat requests, per system and
    concurrency (its best is each system's figure)."""
    w = Workload(f"{n}x32", prompts(n), [32] * n)
    out: dict[str, Any] = {"n": n, "max_tokens": 32, **{system: {} for system in GATEWAY_METERS}}
    for concurrency in GATEWAY_CONCURRENCIES:
        for system in GATEWAY_METERS:
            out[system][str(concurrency)] = {
                "times": [], "cpu_s": {p: [] for p in GATEWAY_METERS[system]}}
        for rep in range(reps):
            for system in _turns(rep):
                runs = out[system][str(concurrency)]
                cpu0 = {p: processes.cpu_s(procs[p]) for p in GATEWAY_METERS[system]}
                runs["times"].append(openai_server.run_chat(w, ports[system], concurrency))
                for p in GATEWAY_METERS[system]:
                    runs["cpu_s"][p].append(processes.cpu_s(procs[p]) - cpu0[p])
    return out


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


def bench_metrics(env: dict[str, str], reps: int) -> dict[str, Any]:
    from benchmarks.systems import metrics

    return metrics.measure(env, reps)


def bench_priority(env: dict[str, str], reps: int) -> dict[str, Any]:
    from benchmarks.systems import priority

    return priority.measure(env, reps)


def bench_batch(env: dict[str, str], reps: int) -> dict[str, Any]:
    from benchmarks.systems import batchfile

    return batchfile.measure(env, reps)


def bench_remote(env: dict[str, str], reps: int) -> dict[str, Any]:
    from benchmarks.systems import remote

    return remote.measure(env, reps)


if __name__ == "__main__":
    main()
