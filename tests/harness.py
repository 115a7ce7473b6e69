"""Real processes for the tests: private Redis, fleet workers started with `fleet worker`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

HOST = "test"
PROBE = "tests.engine_probe"  # test-only: reads the worker's vLLM engine from inside
READY_TIMEOUT_S = 240.0


@dataclass
class WorkerProc:
    """One `fleet worker` process and what the tests need to know about it."""

    model: str
    engine_id: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def node(self) -> str:
        return f"{self.engine_id}@{HOST}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tree(self) -> list[psutil.Process]:
        """This worker and every process below it."""
        try:
            proc = psutil.Process(self.process.pid)
            return [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


class Fleet:
    """Starts and stops real workers against the session's Redis."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env = env
        self.logdir = logdir
        self.workers: list[WorkerProc] = []

    def start(self, model: str, engine_id: str, *, gpus: str = "",
              include: str | None = None, env: dict[str, str] | None = None) -> WorkerProc:
        """A `fleet worker`; with ``include``, the same celery command line plus test-only
        modules (the engine probe, fault injection), pinned as `fleet worker --gpus` pins;
        ``env`` adds to the session's environment."""
        log_path = self.logdir / f"worker-{engine_id}.log"
        env = {**self.env, **(env or {})}
        argv = [sys.executable, "-m", "producer.cli", "worker", "--model", model,
                "--engine-id", engine_id, "--host", HOST, "--loglevel", "INFO", "--gpus", gpus]
        if include is not None:
            from producer.cli import worker_argv

            argv = [*worker_argv(model, engine_id, gpus, int(self.env["FLEET_WORKER_CONCURRENCY"]),
                                 "INFO", HOST), "--include", include]
            env = {**env, "CUDA_VISIBLE_DEVICES": gpus} if gpus else env
        with log_path.open("wb") as log:
            process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        worker = WorkerProc(model, engine_id, process, log_path)
        self.workers.append(worker)
        return worker

    def wait_ready(self, app: Any, *workers: WorkerProc, timeout: float = READY_TIMEOUT_S) -> None:
        """Until each worker's engine is warm and it consumes its model queue."""
        deadline = time.monotonic() + timeout
        waiting = {w.node: w for w in workers}
        while waiting:
            for w in waiting.values():
                if w.process.poll() is not None:
                    code = w.process.returncode
                    raise RuntimeError(f"{w.node} exited {code}:\n{w.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready: {sorted(waiting)}")
            queues = app.control.inspect(destination=list(waiting), timeout=1.0).active_queues()
            for node, qs in (queues or {}).items():
                if f"fleet.model.{waiting[node].model}" in {q["name"] for q in qs}:
                    del waiting[node]
            time.sleep(0.5)

    def stop(self, worker: WorkerProc, timeout: float = 60.0) -> int:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGTERM)
            try:
                worker.process.wait(timeout)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        return worker.process.returncode

    def kill(self, worker: WorkerProc) -> None:
        """SIGKILL the worker and everything below it: no warm shutdown, no acks, no cleanup."""
        for proc in reversed(worker.tree()):
            proc.kill()
        worker.process.wait()

    def stop_all(self) -> None:
        for worker in self.workers:
            for proc in worker.tree()[1:]:
                proc.kill()
            self.stop(worker)


def _reply(app: Any, command: str, node: str, **arguments: Any) -> dict[str, Any]:
    replies = app.control.broadcast(command, destination=[node], reply=True, timeout=2.0,
                                    arguments=arguments)
    for reply in replies:
        if node in reply:
            return dict(reply[node])
    raise LookupError(f"{node} did not answer {command!r}")


def engine_info(app: Any, node: str) -> dict[str, Any]:
    """The worker's answer to `celery inspect engine`."""
    return _reply(app, "engine", node)


def engine_probe(app: Any, node: str, *, reset: bool = False) -> dict[str, Any]:
    """What the worker's vLLM engine itself saw (tests/engine_probe.py): ``added`` (request id
    -> times added), ``peak_unfinished`` since the last reset, ``unfinished`` now."""
    return _reply(app, "probe", node, reset=reset)


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``processes`` still running (zombies count as gone); the list must not be
    empty, or a check that none is left would pass on nothing."""
    assert processes, "no process to check"
    left = []
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.NoSuchProcess:  # gone between the two questions
            pass
    return left


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.05) -> None:
    """Until ``predicate()`` holds; TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(interval)


def project_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(extra)
    return env


def result_of(handle: Any, redis_client: Any, timeout: float) -> Any:
    """``handle.get(timeout)``; on a timeout, fail saying where the task is: its stored result
    (then the waiter missed it), its message still queued or held unacknowledged (then no
    worker finished it), or nowhere (lost)."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    from producer import naming

    try:
        return handle.get(timeout=timeout)
    except CeleryTimeout:
        stored = redis_client.get(f"celery-task-meta-{handle.id}")
        held = [tag for tag, raw in redis_client.hgetall(naming.UNACKED_KEY).items()
                if handle.id.encode() in raw]
        waiting = [key for key in redis_client.scan_iter(match="fleet.model.*")
                  if redis_client.type(key) == b"list"
                  and any(handle.id.encode() in m for m in redis_client.lrange(key, 0, -1))]
        ages = [round(time.time() - score, 1) if score is not None else None
                for score in (redis_client.zscore(naming.UNACKED_INDEX_KEY, t) for t in held)]
        raise AssertionError(
            f"no result for {handle.id} after {timeout:.0f}s: stored result {stored!r}; "
            f"unacknowledged delivery tags {held} (delivered {ages} s ago; sweep lock "
            f"{redis_client.get(naming.UNACKED_MUTEX_KEY)!r}, expiring in "
            f"{redis_client.ttl(naming.UNACKED_MUTEX_KEY)} s); queued in {waiting}; "
            f"deliveries counted {redis_client.get(f'fleet.deliveries.{handle.id}')!r}"
        ) from None


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


GATEWAY_KEY = "sk-test-gateway"


@dataclass
class GatewayProc:
    """One `fleet gateway` process on a free loopback port, with the key GATEWAY_KEY."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process)


def start_gateway(env: dict[str, str], logdir: Path, name: str = "gateway") -> GatewayProc:
    """`fleet gateway` against the session's Redis; returns once /health answers."""
    import urllib.request

    from producer.localredis import free_port

    port = free_port()
    log_path = logdir / f"{name}.log"
    env = {**env, "FLEET_GATEWAY_API_KEYS": f'{{"tests": "{GATEWAY_KEY}"}}'}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "gateway", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    gateway = GatewayProc(process, f"http://127.0.0.1:{port}", log_path)

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited {process.returncode}:\n{gateway.log()}")
        try:
            urllib.request.urlopen(gateway.url + "/health", timeout=2)
            return True
        except OSError:
            return False

    wait_until(up, 60, "the gateway to answer /health")
    return gateway


#: Kombu's Redis priority steps: step 0 is the queue's own list, each other ``<queue>\x06\x16<n>``.
PRIORITY_STEPS = (0, 3, 6, 9)


def step_lists(queue: str) -> list[str]:
    """The Redis lists of a queue, soonest priority step first."""
    return [queue if step == 0 else f"{queue}\x06\x16{step}" for step in PRIORITY_STEPS]


def queued(redis_client: Any, queue: str) -> list[bytes]:
    """Every message waiting in a queue, every priority step included."""
    return [m for key in step_lists(queue) for m in redis_client.lrange(key, 0, -1)]


def drop_queue(redis_client: Any, queue: str) -> None:
    """Remove a queue's lists (every step) and its wake list."""
    from producer.naming import wake_key

    redis_client.delete(*step_lists(queue), wake_key(queue))


#: The key the tests' vLLM servers require, and the variable a remote engine reads it from.
SERVER_KEY = "sk-test-server"
SERVER_KEY_ENV = "FLEET_TEST_SERVER_KEY"


@dataclass
class VllmServer:
    """vLLM's own OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``)
    on the tiny model, on a loopback port, with the key SERVER_KEY; stopped and started again
    on the same port by the tests of remote engines."""

    model_dir: Path
    port: int
    log_path: Path
    served_name: str = "tiny"
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model_dir), "--served-model-name", self.served_name,
                "--dtype", "bfloat16", "--max-model-len", "512", "--enforce-eager",
                "--kv-cache-memory-bytes", str(256 * 2**20), "--max-num-seqs", "256",
                "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                # Random weights favour whitespace: without this, constrained JSON never ends.
                "--structured-outputs-config",
                '{"backend": "xgrammar", "disable_any_whitespace": true}',
                "--api-key", SERVER_KEY, "--host", "127.0.0.1", "--port", str(self.port)]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self, timeout: float = 240.0) -> None:
        """Start it and return once it serves the model."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # one process: stopping it stops it all
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.argv(), env=env, stdout=log,
                                            stderr=subprocess.STDOUT)
        wait_until(self.serving, timeout, f"the vLLM server on port {self.port}", 0.5)

    def serving(self) -> bool:
        import json
        import urllib.request

        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"the vLLM server exited {self.process.returncode}:\n"
                               f"{self.log()[-4000:]}")
        request = urllib.request.Request(self.base_url + "/models",
                                         headers={"Authorization": f"Bearer {SERVER_KEY}"})
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
                return self.served_name in {m["id"] for m in json.load(r)["data"]}
        except OSError:
            return False

    def metric(self, name: str) -> float:
        """One gauge of the server's Prometheus /metrics (summed over its labels)."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            lines = r.read().decode().splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines
                   if line.startswith(name + "{") or line.startswith(name + " "))

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
