"""Starting and stopping the processes a benchmark measures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

LOGS = Path(".fleet/bench")


def spawn(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    LOGS.mkdir(parents=True, exist_ok=True)
    with (LOGS / f"{name}.log").open("wb") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


def fleet_worker(model: str, engine_id: str, env: dict[str, str],
                 gpus: str = "") -> subprocess.Popen[bytes]:
    return spawn(f"worker-{engine_id}", [sys.executable, "-m", "producer.cli", "worker",
                                          "--model", model, "--engine-id", engine_id,
                                          "--gpus", gpus, "--loglevel", "WARNING"], env)


def celery_worker(app: str, name: str, env: dict[str, str],
                  *extra: str) -> subprocess.Popen[bytes]:
    return spawn(name, [sys.executable, "-m", "celery", "-A", app, "worker", "-n",
                        f"{name}@bench", "-l", "WARNING", "--without-gossip", "--without-mingle",
                        *extra], env)


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def rss(process: subprocess.Popen[bytes]) -> int:
    """Resident memory of a process and its children."""
    proc = psutil.Process(process.pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def cpu_s(process: subprocess.Popen[bytes]) -> float:
    """CPU seconds (user + system, every thread) a process and its children have used."""
    proc = psutil.Process(process.pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        times = p.cpu_times()
        total += times.user + times.system
    return total


def stop(process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            for p in psutil.Process(process.pid).children(recursive=True):
                p.kill()
            process.kill()
            process.wait()


def env_with(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(values)
    return env
