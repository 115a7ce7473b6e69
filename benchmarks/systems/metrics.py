"""What a worker's metrics cost: the same per-task load on two resident workers of the tiny
model, one with ``FLEET_METRICS_PORT`` (vLLM's stat logging on, the fleet's counters, its
``/metrics`` scraped every second), one without; their runs interleaved.

The figure is the worker's CPU time per task (every thread, the engine's included), with the
wall time beside it.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from typing import Any

from benchmarks import processes
from benchmarks.systems import fleet as fleet_system
from benchmarks.workloads import Workload, prompts

#: The metrics-on worker's model: the tiny model's weights and settings under another id, so
#: each worker has a queue of its own.
ON_MODEL = "tiny-metrics"
#: Seconds between two scrapes while the metrics-on worker serves (Prometheus' default: 15).
SCRAPE_S = 1.0


def measure(env: dict[str, str], reps: int, *, n: int = 1024, max_tokens: int = 32
            ) -> dict[str, Any]:
    """CPU seconds and wall seconds of ``n`` ``.delay()`` tasks per run, metrics on and off."""
    from producer.client import wait_for_engine
    from producer.engines import list_engines
    from producer.settings import get_settings, tiny_model_config

    tiny = tiny_model_config(get_settings().tiny_model_dir()).model_dump(
        mode="json", exclude_defaults=True)
    models = {**json.loads(env.get("FLEET_MODELS") or "{}"), ON_MODEL: tiny}
    env = {**env, "FLEET_MODELS": json.dumps(models)}
    os.environ["FLEET_MODELS"] = env["FLEET_MODELS"]  # this process sends to ON_MODEL too
    get_settings.cache_clear()
    workers = {
        "off": ("tiny", processes.fleet_worker("tiny", "bench-metrics-off", env)),
        "on": (ON_MODEL, processes.fleet_worker(
            ON_MODEL, "bench-metrics-on", {**env, "FLEET_METRICS_PORT": "0"})),
    }
    try:
        for model, _ in workers.values():
            wait_for_engine(model, timeout=600)
        url = next(e["metrics_url"] for e in list_engines(ON_MODEL))
        w = Workload(f"{n}x{max_tokens}", prompts(n), [max_tokens] * n)
        small = Workload("warm-up", w.prompts[:64], w.max_tokens[:64])
        for model, _ in workers.values():
            fleet_system.through_delay(small, model)
        out: dict[str, Any] = {"n": n, "max_tokens": max_tokens, "scrape_s": SCRAPE_S,
                               "on": {"times": [], "cpu_s": []},
                               "off": {"times": [], "cpu_s": []}}
        for rep in range(reps):
            for side in ("on", "off") if rep % 2 == 0 else ("off", "on"):
                model, worker = workers[side]
                with _Scraper(url if side == "on" else None):
                    cpu0 = processes.cpu_s(worker)
                    out[side]["times"].append(fleet_system.through_delay(w, model))
                    out[side]["cpu_s"].append(processes.cpu_s(worker) - cpu0)
        return out
    finally:
        for _, worker in workers.values():
            processes.stop(worker)


class _Scraper:
    """Scrapes ``url`` every SCRAPE_S seconds while in its ``with`` block (none: idles)."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Scraper:
        if self.url is not None:
            self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        if self.url is not None:
            self.thread.join()

    def _run(self) -> None:
        assert self.url is not None
        while not self.stop.is_set():
            started = time.monotonic()
            with urllib.request.urlopen(self.url, timeout=10) as response:
                response.read()
            self.stop.wait(max(0.0, SCRAPE_S - (time.monotonic() - started)))
