"""Single-task latency, interleaved: ``python -m benchmarks.latency [--calls 300] [--rounds 3]``.

The fleet with the fake engine, stock Celery's solo pool and stock Celery's threads pool with
task events (the pool and events the fleet itself uses) all stay up on one private Redis; each
round times ``--calls`` sequential ``.delay().get()`` calls on each in turn, so every round's
three figures met the same noise. The suite's overhead step measures the fleet and the solo
pool one after the other; this one is for comparing changes to the single-task path.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks import processes
from benchmarks.run import FAKE_MODELS, configure_this_process
from benchmarks.systems.overhead import latencies
from producer.localredis import LocalRedis


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with LocalRedis() as redis:
        env = processes.env_with(FLEET_BROKER_URL=redis.url, BENCH_BROKER_URL=redis.url,
                                 FLEET_MODELS=FAKE_MODELS)
        configure_this_process(env)
        from benchmarks.systems.noop_app import app as noop_app
        from benchmarks.systems.noop_app import echo
        from producer.client import generate, wait_for_engine

        started = [
            processes.fleet_worker("fake", "fake-1", env),
            processes.celery_worker("benchmarks.systems.noop_app", "noop", env, "-P", "solo"),
            processes.celery_worker("benchmarks.systems.noop_app", "noopt", env, "-P", "threads",
                                    "-E", "-Q", "noopt"),
        ]
        try:
            wait_for_engine("fake", timeout=120)
            echo.delay(0).get(timeout=60)
            echo.apply_async((0,), queue="noopt").get(timeout=60)
            systems: dict[str, Any] = {
                "fleet": lambda i: generate(f"ping {i}", model="fake", max_tokens=1, timeout=30),
                "stock solo": lambda i: echo.delay(i).get(timeout=30),
                "stock threads -E": lambda i: echo.apply_async((i,), queue="noopt").get(
                    timeout=30),
            }
            for _ in range(args.rounds):
                row = {name: latencies(call, args.calls) for name, call in systems.items()}
                print(" | ".join(f"{name} p50 {ms['p50']:.2f} p99 {ms['p99']:.2f} ms"
                                 for name, ms in row.items()), flush=True)
        finally:
            noop_app.control.shutdown(destination=["noop@bench", "noopt@bench"])
            for process in started:
                processes.stop(process)


if __name__ == "__main__":
    main()
