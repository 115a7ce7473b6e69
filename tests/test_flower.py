"""`fleet flower`: loopback only, basic auth from settings, shows the engines and their tasks,
every queue of the fleet with its depth (``/api/queues/length``, the broker page, the dashboard)
and each engine's report on its worker page, in a headless Chromium too."""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import psutil
import pytest

from producer import generate, naming
from producer.localredis import free_port
from tests.harness import Fleet, WorkerProc, wait_until
from tests.required import require_module, require_program

FAKE = "flower-fake"  # served by the fake-engine worker FAKE_ENGINE
FAKE_ENGINE = "flw1"
UNSERVED = "flower-none"  # configured, never served: its tasks wait
WAITING = 3

require_module("flower")  # the `flower` extra


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
    # The password is in Flower's environment, not on any command line of the host.
    flower_pids = {c.pid for c in psutil.net_connections("tcp")
                   if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert flower_pids
    for process in psutil.process_iter(["cmdline"]):
        assert auth[1] not in " ".join(process.info["cmdline"] or [])


def test_the_broker_url_names_the_redis_scheme_not_the_transport_class(
        app: Any, fleet_env: dict[str, str]) -> None:
    from celery import Celery

    from producer.celery_app import AMQP
    from producer.flower import fleet_broker

    connection = app.connection()
    assert connection.as_uri(include_password=True) == fleet_env["FLEET_BROKER_URL"]
    assert connection.as_uri().startswith("redis://:**@127.0.0.1:")
    assert connection.transport_cls == "producer.transport:Transport"  # still the fleet's
    copy = pickle.loads(pickle.dumps(connection))
    assert (type(copy), copy.transport_cls) == (type(connection), connection.transport_cls)
    assert type(fleet_broker(app, connection.as_uri(include_password=True))).__name__ == "Redis"
    # TLS: the scheme says so, and Flower's reader gets the URL's TLS options (a private CA).
    tls = Celery("tls", amqp=AMQP, set_as_current=False, broker_transport=(
        "producer.transport:Transport"), broker_url=(
        "rediss://:pw@127.0.0.1:1/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/fleet-ca.pem"))
    uri = tls.connection().as_uri(include_password=True)
    assert uri == "rediss://:pw@127.0.0.1:1/0"
    reader = fleet_broker(tls, uri)
    assert type(reader).__name__ == "RedisSsl"
    assert reader.redis.connection_pool.connection_kwargs["ssl_ca_certs"] == "/etc/fleet-ca.pem"


def test_the_fleet_queues_are_every_model_engine_and_dead_letter_queue(
        fleet_env: dict[str, str]) -> None:
    from producer.flower import fleet_queue_names
    from producer.settings import get_settings

    settings = get_settings()
    names = fleet_queue_names(settings, ["other.queue"], ["e1@host", "not an id@host"])
    models = sorted(settings.all_models())
    assert names == [*(naming.model_queue(m) for m in models), naming.engine_queue("e1"),
                     *sorted([*(naming.dead_letter_queue(m) for m in models),
                              naming.dead_letter_queue("unknown"), naming.MALFORMED_QUEUE]),
                     "other.queue"]
    assert naming.model_queue(UNSERVED) in names and "tiny" in models


def test_the_engine_table_reads_old_and_new_reports() -> None:
    from producer.flower import engine_rows

    old = {label: text for label, text, _ in engine_rows(
        {"model": "m", "engine_id": "e", "gpus": [], "state": "ready", "running": 1,
         "max_running": 8, "uptime_s": 75.5})}
    assert old == {"Model": "m", "Engine id": "e", "GPUs": "CPU", "State": "ready",
                   "Running": "1", "Most running at once": "8",
                   "Uptime": "1m 16s"}  # no row for what it lacks
    new = engine_rows({"gpus": ["0", "1"], "waiting": 1200, "kv_cache_usage": 0.125,
                       "metrics_url": "http://h:9/metrics", "a_new_fact": 7})
    assert new == [("GPUs", "0, 1", None), ("Waiting", "1,200", None),
                   ("KV cache in use", "12.5 %", None),
                   ("Metrics", "http://h:9/metrics", "http://h:9/metrics"),
                   ("a_new_fact", "7", None)]
    assert engine_rows({"metrics_url": "javascript:alert(1)"})[0][2] is None  # text, no link


@pytest.fixture(scope="module")
def watched(flower: tuple[str, tuple[str, str]], fleet_env: dict[str, str], app: Any,
            redis_client: Any, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[str, tuple[str, str], WorkerProc]]:
    """Flower, a fake-engine worker that served two tasks, WAITING tasks queued for a model no
    engine serves and one dead letter of that model; once Flower has seen the worker."""
    base, auth = flower
    fleet = Fleet(fleet_env, tmp_path_factory.mktemp("flower-logs"))
    left = (naming.model_queue(UNSERVED), naming.dead_letter_queue(UNSERVED))
    try:
        worker = fleet.start(FAKE, FAKE_ENGINE)
        fleet.wait_ready(app, worker)
        for i in range(2):
            generate.delay(f"served {i}", model=FAKE, max_tokens=2).get(timeout=60)
        for i in range(WAITING):
            generate.delay(f"waiting {i}", model=UNSERVED, max_tokens=1)
        redis_client.lpush(left[1], json.dumps({"id": "dead-1", "task": naming.GENERATE_TASK}))

        def listed() -> bool:  # from the worker's heartbeats, within seconds of its start
            _, lengths = _get(base + "/api/queues/length", auth)
            names = {q["name"] for q in (lengths or {}).get("active_queues", [])}
            return naming.engine_queue(FAKE_ENGINE) in names

        wait_until(listed, 60, "Flower never listed the engine's queue", interval=0.5)
        yield base, auth, worker
    finally:
        fleet.stop_all()
        redis_client.delete(*left)


class _Tables(HTMLParser):
    """The text of each cell of each table of a page, by the table's id."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._rows: list[list[str]] | None = None
        self._cells: list[str] | None = None
        self._text: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._rows = self.tables.setdefault(dict(attrs).get("id") or "", [])
        elif tag == "tr" and self._rows is not None:
            self._cells = []
        elif tag in ("td", "th") and self._cells is not None:
            self._text = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cells is not None and self._text is not None:
            self._cells.append(" ".join("".join(self._text).split()))
            self._text = None
        elif tag == "tr" and self._rows is not None and self._cells is not None:
            self._rows.append(self._cells)
            self._cells = None
        elif tag == "table":
            self._rows = None

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)


def _page(url: str, auth: tuple[str, str]) -> str:
    token = base64.b64encode(":".join(auth).encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": "Basic " + token})
    with urllib.request.urlopen(request, timeout=30) as r:
        return str(r.read().decode())


def _check_pages(pages: dict[str, str]) -> None:
    """What an operator must see on the dashboard, the worker page and the broker page."""
    dashboard = _Tables(pages["dashboard"]).tables
    engines = {row[0]: row for row in dashboard["fleet-engines"][1:]}
    assert engines[FAKE_ENGINE][1:4] == [FAKE, "CPU", "ready"]
    queues = {row[0]: row[1:] for row in dashboard["fleet-queues"][1:]}
    assert queues[naming.model_queue(UNSERVED)] == [str(WAITING), "no engine"]
    assert queues[naming.model_queue(FAKE)] == ["0", FAKE_ENGINE]
    assert queues[naming.dead_letter_queue(UNSERVED)][0] == "1"
    assert queues[naming.MALFORMED_QUEUE][0].isdigit()

    engine = dict(_Tables(pages["worker"]).tables["fleet-engine-table"])
    assert {k: engine[k] for k in ("Model", "Engine id", "Engine", "State", "GPUs")} == {
        "Model": FAKE, "Engine id": FAKE_ENGINE, "Engine": "fake", "State": "ready",
        "GPUs": "CPU"}
    assert int(engine["Requests served"]) >= 2 and engine["Requests in flight"] == "0"
    assert "Uptime" in engine and "Max model len" in engine
    assert "engine_id&#39;" not in pages["worker"] and "'engine_id'" not in pages["worker"]

    broker = {row[0]: row[1] for row in _Tables(pages["broker"]).tables["queue-table"][1:]}
    assert broker[naming.model_queue(UNSERVED)] == str(WAITING)
    assert broker[naming.dead_letter_queue(UNSERVED)] == "1"
    assert broker[naming.engine_queue(FAKE_ENGINE)] == "0"
    assert "redis://" in pages["broker"] and "producer.transport" not in pages["broker"]


PATHS = {"dashboard": "/", "worker": f"/worker/{FAKE_ENGINE}@test", "broker": "/broker"}


def test_flower_shows_every_queue_with_its_depth_and_the_engines_report(
        watched: tuple[str, tuple[str, str], WorkerProc]) -> None:
    base, auth, _ = watched
    status, lengths = _get(base + "/api/queues/length", auth)
    assert status == 200
    depth = {q["name"]: q["messages"] for q in lengths["active_queues"]}
    assert depth[naming.model_queue(UNSERVED)] == WAITING  # no worker consumes it
    assert depth[naming.dead_letter_queue(UNSERVED)] == 1
    assert depth[naming.model_queue(FAKE)] == depth[naming.engine_queue(FAKE_ENGINE)] == 0
    assert naming.MALFORMED_QUEUE in depth and naming.model_queue("tiny") in depth
    assert _get(base + "/api/queues/length")[0] == 401
    _check_pages({name: _page(base + path, auth) for name, path in PATHS.items()})


def artifacts_dir() -> Path:
    """Where the browser test leaves its screenshots: TEST_ARTIFACTS_DIR, else
    .fleet/artifacts in the checkout; a run replaces the last run's files."""
    root = os.environ.get("TEST_ARTIFACTS_DIR") or Path(__file__).parents[1] / ".fleet/artifacts"
    path = Path(root) / "flower"
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_a_browser_shows_the_engines_and_queues(
        watched: tuple[str, tuple[str, str], WorkerProc], tmp_path: Path) -> None:
    chromium = require_program("chromium")
    base, (user, password), _ = watched
    out = artifacts_dir()
    pages = {}
    for name, path in PATHS.items():
        shot = out / f"{name}.png"
        shot.unlink(missing_ok=True)
        # Credentials in the URL: Chromium answers Flower's basic-auth challenge with them, for
        # the page and for the scripts that fill it.
        url = base.replace("http://", f"http://{user}:{password}@") + path
        run = subprocess.run(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1800",
             "--virtual-time-budget=8000", f"--screenshot={shot}", "--dump-dom", url],
            capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        assert shot.stat().st_size > 10_000, f"{shot} is blank"
        (out / f"{name}.html").write_text(run.stdout)
        pages[name] = run.stdout
    _check_pages(pages)
    # The page's own scripts ran: Flower's workers table lists the node.
    workers = _Tables(pages["dashboard"]).tables["workers-table"]
    assert any(row and row[0] == f"{FAKE_ENGINE}@test" for row in workers)
