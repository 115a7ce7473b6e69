"""What priorities buy an interactive caller on a worker saturated by a bulk job.

One resident worker of the tiny model per engine setting. A bulk job (``generate_batch`` of
``BULK`` prompts x 32 tokens, priority ``batch``) keeps it busy while one interactive caller
sends a 32-token request every 0.5 s (``interactive``) and waits for each. Three kinds of run,
interleaved, each going first in turn:

- ``alone``: the bulk job with no interactive caller (its throughput is the reference);
- ``on``: with the caller, at their levels (``batch`` and ``interactive``);
- ``off``: with the caller, everything at one level (``default``): priorities off.

Before them, the caller alone on the idle worker gives the idle latency the others are
compared with. Latencies are end to end through ``producer.client.generate``.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from benchmarks import processes
from benchmarks.workloads import prompts

#: Prompts of the bulk job.
BULK = int(os.environ.get("BENCH_PRIORITY_BULK", "20000"))
#: Tokens of every request (bulk and interactive).
TOKENS = 32
#: Seconds between two interactive requests.
EVERY_S = 0.5
#: Interactive requests on the idle worker.
IDLE_CALLS = 20
#: Engine settings measured: the tiny model as configured (max_num_seqs 1,024), and the same
#: with at most 256 requests in vLLM's running batch.
SETTINGS = {"tiny": None, "tiny-seqs256": 256}
KINDS = ("alone", "on", "off")


def measure(env: dict[str, str], reps: int) -> dict[str, Any]:
    from producer.client import generate_batch, wait_for_engine
    from producer.settings import get_settings, tiny_model_config

    tiny = tiny_model_config(get_settings().tiny_model_dir())
    models = json.loads(env.get("FLEET_MODELS") or "{}")
    for model, seqs in SETTINGS.items():
        if seqs is not None:
            models[model] = tiny.model_copy(update={"max_num_seqs": seqs}).model_dump(
                mode="json", exclude_defaults=True)
    env = {**env, "FLEET_MODELS": json.dumps(models)}
    os.environ["FLEET_MODELS"] = env["FLEET_MODELS"]
    get_settings.cache_clear()
    out: dict[str, Any] = {"bulk": BULK, "max_tokens": TOKENS, "every_s": EVERY_S}
    for model, seqs in SETTINGS.items():
        worker = processes.fleet_worker(model, f"bench-prio-{model}", env)
        try:
            wait_for_engine(model, timeout=600)
            generate_batch(prompts(512), model=model, max_tokens=TOKENS, temperature=0.0,
                           timeout=600, progress=False)  # warm every shape
            runs: dict[str, Any] = {
                "max_num_seqs": seqs or tiny.max_num_seqs,
                "idle_ms": _caller_alone(model), **{kind: [] for kind in KINDS}}
            for rep in range(reps):
                order = KINDS[rep % 3:] + KINDS[:rep % 3]
                for kind in order:
                    cpu0 = processes.cpu_s(worker)
                    run = _bulk_run(model, kind, rep)
                    run["cpu_s"] = processes.cpu_s(worker) - cpu0
                    runs[kind].append(run)
                    print(f"   {model} {kind}: bulk {run['wall_s']:.1f}s" + (
                        f", interactive p50 {statistics.median(run['interactive_ms']):.0f} ms"
                        if run["interactive_ms"] else ""), flush=True)
            out[model] = runs
        finally:
            processes.stop(worker)
    return out


def _one(model: str, prompt: str, priority: str) -> float:
    """Milliseconds of one 32-token request, end to end."""
    from producer.client import generate

    t0 = time.perf_counter()
    generate(prompt, model=model, max_tokens=TOKENS, ignore_eos=True, temperature=0.0,
             priority=priority, timeout=600)
    return (time.perf_counter() - t0) * 1e3


def _caller_alone(model: str) -> list[float]:
    out = []
    for i, prompt in enumerate(prompts(IDLE_CALLS, seed=300)):
        out.append(_one(model, prompt, "interactive"))
        time.sleep(max(0.0, EVERY_S - out[-1] / 1e3)) if i < IDLE_CALLS - 1 else None
    return out


def _bulk_run(model: str, kind: str, rep: int) -> dict[str, Any]:
    """The bulk job's wall time and, with the caller, each interactive request's latency."""
    from producer.client import generate_batch

    bulk_priority, caller_priority = ("default", "default") if kind == "off" else (
        "batch", "interactive")
    done = threading.Event()
    calls: list[Future[float]] = []
    work = prompts(BULK, seed=1000 + rep)
    with ThreadPoolExecutor(max_workers=256, thread_name_prefix="caller") as pool:
        def caller() -> None:
            asks = prompts(1000, seed=2000 + rep)
            start = time.monotonic() + 1.0  # once the job has reached the worker
            k = 0
            while not done.wait(max(0.0, start + k * EVERY_S - time.monotonic())):
                calls.append(pool.submit(_one, model, asks[k % len(asks)], caller_priority))
                k += 1

        thread = threading.Thread(target=caller, daemon=True)
        if kind != "alone":
            thread.start()
        t0 = time.perf_counter()
        results = generate_batch(work, model=model, max_tokens=TOKENS, ignore_eos=True,
                                 temperature=0.0, priority=bulk_priority, timeout=1800,
                                 progress=False)
        wall = time.perf_counter() - t0
        done.set()
        if kind != "alone":
            thread.join()
        latencies = [call.result() for call in calls]
    short = sum(r.completion_tokens < TOKENS for r in results)
    if short:
        raise AssertionError(f"{short} bulk answers shorter than {TOKENS} tokens")
    return {"wall_s": wall, "interactive_ms": latencies}
