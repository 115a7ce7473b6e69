"""`fleet flower`: loopback only, basic auth from settings, shows the engines and their tasks."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from producer import generate
from producer.localredis import free_port
from tests.harness import WorkerProc, wait_until


def _get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, Any]:
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, None


def test_flower_refuses_to_start_without_credentials(fleet_env: dict[str, str]) -> None:
    out = subprocess.run([sys.executable, "-m", "producer.cli", "flower"], env=fleet_env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "FLEET_FLOWER_PASSWORD" in out.stderr + out.stdout


@pytest.fixture(scope="module")
def flower(fleet_env: dict[str, str]) -> Iterator[tuple[str, tuple[str, str]]]:
    port = free_port()
    auth = ("watcher", "s3cret-pass")
    env = {**fleet_env, "FLEET_FLOWER_USER": auth[0], "FLEET_FLOWER_PASSWORD": auth[1],
           "FLEET_FLOWER_PORT": str(port)}
    process = subprocess.Popen([sys.executable, "-m", "producer.cli", "flower"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"

    def answering() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"flower exited {process.returncode} before answering")
        try:
            urllib.request.urlopen(base + "/healthcheck", timeout=2)
        except urllib.error.HTTPError:
            return True  # answering, if only with 401
        except OSError:
            return False
        return True

    try:
        wait_until(answering, 60, "flower did not answer within 60 s", interval=0.3)
        yield base, auth
    finally:
        process.terminate()
        process.wait(30)


def _seen(base: str, auth: tuple[str, str], handles: list[Any], every: bool = False) -> bool:
    """Whether Flower lists these tasks (any, or every one) as succeeded."""
    _, tasks = _get(base + "/api/tasks", auth)
    done = [h.id in (tasks or {}) and tasks[h.id]["state"] == "SUCCESS" for h in handles]
    return bool(done) and (all(done) if every else any(done))


@pytest.mark.engine
def test_flower_shows_engines_and_tasks_behind_auth(
    flower: tuple[str, tuple[str, str]], workers_ab: tuple[WorkerProc, WorkerProc], app: Any
) -> None:
    base, auth = flower
    status, _ = _get(base + "/api/workers")
    assert status == 401
    status, _ = _get(base + "/api/workers", ("watcher", "wrong"))
    assert status == 401
    # Flower sees only events sent after its event receiver connected, which may come a moment
    # after its HTTP port answers: keep sending until it has seen one task, then check a burst.
    deadline = time.monotonic() + 90
    probes: list[Any] = []
    while not _seen(base, auth, probes):
        assert time.monotonic() < deadline, "Flower never showed a task"
        probes.append(generate.delay("probe", model="tiny", max_tokens=1))
        probes[-1].get(timeout=120)
        time.sleep(0.5)
    handles = [generate.delay(f"watched {i}", model="tiny", max_tokens=2) for i in range(3)]
    for h in handles:
        h.get(timeout=120)
    deadline = time.monotonic() + 60
    while not _seen(base, auth, handles, every=True) and time.monotonic() < deadline:
        time.sleep(1)
    _, workers = _get(base + "/api/workers?refresh=1", auth)
    _, tasks = _get(base + "/api/tasks", auth)
    assert {"a1@test", "b1@test"} <= set(workers)
    assert workers["a1@test"]["stats"]["engine"]["model"] == "tiny"  # the worker page's stats
    assert {h.id for h in handles} <= set(tasks)
    assert all(tasks[h.id]["state"] == "SUCCESS" for h in handles)


def _post(url: str, auth: tuple[str, str] | None = None) -> int:
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    request = urllib.request.Request(url, data=b"", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@pytest.mark.engine
def test_flower_control_api_needs_auth_and_binds_loopback(
    flower: tuple[str, tuple[str, str]], workers_ab: tuple[WorkerProc, WorkerProc]
) -> None:
    base, auth = flower
    for path in ("/api/worker/shutdown/a1@test", "/api/worker/pool/restart/a1@test",
                 "/api/task/revoke/some-task-id", "/api/worker/queue/cancel-consumer/a1@test"):
        assert _post(base + path) == 401
        assert _post(base + path, ("watcher", "wrong")) == 401
    assert workers_ab[0].process.poll() is None  # nobody shut it down
    assert _post(base + "/api/task/revoke/no-such-task", auth) == 200  # auth is the only gate
    port = int(base.rsplit(":", 1)[1])
    listening = [c.laddr for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening)
