"""``fleet demo``: the whole fleet on one machine, started and stopped cleanly.

Starts a private password-protected Redis, a worker holding the real vLLM engine with the
embedded tiny model, and Flower behind basic auth; runs an application in a separate process
that enqueues generate and chat tasks with ``.delay()``; prints the results; stops everything.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO

from producer.localredis import LocalRedis, free_port

APP_CODE = """
import json, time
from producer import generate, chat
from producer.client import generate_batch, wait_for_engine

print("engines ready:", wait_for_engine("tiny", timeout=300), flush=True)
t0 = time.perf_counter()
g = generate.delay("Write a haiku about queues", model="tiny", temperature=0.3, max_tokens=24)
c = chat.delay([{"role": "user", "content": "hi, who are you?"}], model="tiny", max_tokens=24)
print("generate ->", json.dumps(g.get(timeout=120)), flush=True)
print("chat     ->", json.dumps(c.get(timeout=120)), flush=True)
batch = generate_batch([f"prompt {i}" for i in range(64)], model="tiny", max_tokens=16,
                       temperature=0.0, timeout=300)
print(f"batch    -> {len(batch)} results in order, first: {batch[0].text!r}", flush=True)
print(f"app done in {time.perf_counter() - t0:.2f}s", flush=True)
"""


def run_demo() -> int:
    workdir = Path(os.environ.get("FLEET_DEMO_DIR", ".fleet/demo")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    user, password = "fleet", secrets.token_urlsafe(12)
    flower_port = free_port()
    with LocalRedis(workdir=workdir / "redis") as redis:
        env = {
            **os.environ,
            "FLEET_BROKER_URL": redis.url,
            "FLEET_FLOWER_USER": user,
            "FLEET_FLOWER_PASSWORD": password,
            "FLEET_FLOWER_PORT": str(flower_port),
        }
        print(f"redis     : private redis-server on 127.0.0.1:{redis.port} (password set)")
        _fleet(["build-tiny-model"], env, check=True)
        worker_log = (workdir / "worker.log").open("wb")
        flower_log = (workdir / "flower.log").open("wb")
        worker = _spawn(["worker", "--model", "tiny", "--engine-id", "demo-1"], env, worker_log)
        flower = _spawn(["flower"], env, flower_log)
        print(f"worker    : pid {worker.pid}, node demo-1@<host>, log {worker_log.name}")
        print(f"flower    : http://127.0.0.1:{flower_port} (user {user!r}), log {flower_log.name}")
        try:
            app = subprocess.run([sys.executable, "-c", APP_CODE], env=env, timeout=900)
            _show_flower(flower_port, user, password)
            if app.returncode:
                return app.returncode
        finally:
            for process in (flower, worker):
                _stop(process)
    left = _leftovers()
    print("stopped   : worker, flower and redis;",
          f"left behind: {left}" if left else "no process left behind")
    return 1 if left else 0


def _fleet(args: list[str], env: dict[str, str], *, check: bool) -> None:
    subprocess.run([sys.executable, "-m", "producer.cli", *args], env=env, check=check,
                   stdout=subprocess.DEVNULL)


def _spawn(args: list[str], env: dict[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "producer.cli", *args], env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _show_flower(port: int, user: str, password: str) -> None:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/workers?refresh=1",
                                     headers={"Authorization": f"Basic {token}"})
    for _ in range(20):
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                workers = json.load(response)
            print(f"flower    : sees workers {sorted(workers)}")
            return
        except OSError:
            time.sleep(0.5)
    print("flower    : did not answer")


def _leftovers() -> list[str]:
    """Processes this demo started that are still alive."""
    import psutil

    return [f"{p.pid} {p.name()}" for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _stop(process: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
