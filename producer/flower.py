"""The fleet's Flower: Flower, pinned and unmodified, with four handlers of the fleet's own.

``fleet flower`` runs ``python -m producer.flower <Flower's options>``, which puts the fleet's
handlers ahead of Flower's routes and then runs ``celery -A producer flower`` in this process.
Each handler subclasses Flower's own view for its path:

- ``/broker`` and ``/api/queues/length`` list every queue of the fleet with its depth, not only
  those some worker consumes: the queue of every configured model (tasks wait there for a model
  no engine serves), each live engine's queue, and the dead-letter lists;
- ``/worker/<node>`` shows the engine's report (the ``engine`` key of ``celery inspect stats``)
  as an "Engine" table instead of one dict in the "Other" tab;
- ``/`` and ``/workers`` start with a summary: every engine with its model, GPUs and state, and
  every queue with its depth.

The fragments are the fleet's own templates (``producer/templates``), inserted into the pages
Flower renders; tests/test_pins.py checks the Flower names and page anchors this relies on.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from flower import urls
from flower.api.tasks import GetQueueLengths
from flower.utils.broker import Broker
from flower.utils.template import format_duration
from flower.views import BaseHandler
from flower.views.broker import BrokerView
from flower.views.workers import WorkersView, WorkerView
from tornado import template, web
from tornado.ioloop import IOLoop

from producer import naming
from producer.engines import list_engines
from producer.settings import FleetSettings, get_settings

log = logging.getLogger(__name__)

TEMPLATES = template.Loader(str(Path(__file__).with_name("templates")))
#: Where the fragments go in Flower's pages: the engine table above the worker page's tabs, the
#: summary above the dashboard's workers table (else at the end of the page's main part).
WORKER_ANCHOR = b'<div class="worker-tabs">'
DASHBOARD_ANCHOR = b'<section class="workers-table-card"'
FALLBACK_ANCHOR = b"</main>"


def fleet_queue_names(settings: FleetSettings, consumed: Iterable[str],
                      nodes: Iterable[str]) -> list[str]:
    """The queues an operator watches: those consumed, every configured model's, the engine
    queue of each node named ``<engine_id>@<host>``, and the dead-letter lists."""
    models = list(settings.all_models())
    names = set(consumed) | {naming.model_queue(m) for m in models}
    names |= {naming.dead_letter_queue(m) for m in [*models, "unknown"]}
    names.add(naming.MALFORMED_QUEUE)
    for node in nodes:
        with suppress(ValueError):  # not a fleet worker's node name
            names.add(naming.engine_queue(node.partition("@")[0]))
    return sorted(names, key=lambda name: (_rank(name), name))


def _rank(queue: str) -> int:
    """Model queues first, then engine queues, dead-letter lists, anything else."""
    prefixes = (naming.MODEL_QUEUE_PREFIX, naming.ENGINE_QUEUE_PREFIX, naming.DEAD_LETTER_PREFIX)
    return next((i for i, p in enumerate(prefixes) if queue.startswith(p)), len(prefixes))


def fleet_broker(capp: Any, uri: str) -> Any:
    """Flower's reader of the broker's queues, with the connection's TLS options.

    Flower passes it only ``broker_use_ssl``; kombu also reads the ``ssl_*`` options of a
    ``rediss://`` URL (a private CA's file) into the connection, and without them the reader's
    TLS handshake would fail where the workers' succeeds.
    """
    with capp.connection() as connection:
        ssl_options = connection.ssl
    try:
        return Broker(uri, broker_options=capp.conf.broker_transport_options,
                      broker_use_ssl=ssl_options or None)
    except NotImplementedError as e:
        raise web.HTTPError(404, f"broker {urlparse(uri).scheme!r} is not supported") from e


class FleetQueues(BaseHandler):
    """A Flower handler that lists the fleet's queues (see :func:`fleet_queue_names`)."""

    def get_active_queue_names(self) -> list[str]:
        app = self.application
        consumed = {q["name"] for info in app.workers.values()
                    for q in info.get("active_queues", [])}
        # Flower's cache of active queues is as old as its last inspection; the event stream's
        # heartbeats name every live worker within seconds.
        alive = [name for name, worker in app.events.state.workers.items() if worker.alive]
        return fleet_queue_names(get_settings(), consumed, alive)

    def get_broker(self) -> Any:
        return fleet_broker(self.capp, self.application.broker_uri_with_password)


class FleetBrokerView(FleetQueues, BrokerView):
    """Flower's broker page, listing the fleet's queues."""


class FleetQueueLengths(FleetQueues, GetQueueLengths):
    """Flower's ``/api/queues/length``, answering for the fleet's queues."""


class FleetWorkerView(WorkerView):
    """Flower's worker page, with the engine's report as a table of its own."""

    def render_string(self, template_name: str, **kwargs: Any) -> bytes:
        worker = kwargs.get("worker")
        if template_name != "worker.html" or not isinstance(worker, dict):
            return bytes(super().render_string(template_name, **kwargs))
        stats = dict(worker.get("stats") or {})
        engine = stats.pop("engine", None)  # shown here, so not again under "Other"
        page = bytes(super().render_string(
            template_name, **{**kwargs, "worker": {**worker, "stats": stats}}))
        if not isinstance(engine, dict):
            return page
        return insert(page, WORKER_ANCHOR, TEMPLATES.load("flower_engine.html").generate(
            rows=engine_rows(engine)))


class FleetWorkersView(FleetQueues, WorkersView):
    """Flower's dashboard, opened by a summary of the fleet's engines and queues."""

    summary: dict[str, Any] | None = None

    @web.authenticated
    async def get(self) -> None:
        if not self.get_argument("json", default=False, type=bool):  # the page, not its refresh
            self.summary = await self.fleet_summary()
        await super().get()

    async def fleet_summary(self) -> dict[str, Any]:
        """Every live engine and every fleet queue with its depth, for the summary."""
        # Asked afresh on each page load: Flower's cache of the workers' stats is refreshed only
        # when someone opens a worker page or asks for a refresh, so an engine's state in it may
        # be minutes old. One broadcast answers for every engine within the inspect timeout,
        # run in Flower's executor so the server keeps serving meanwhile.
        timeout = self.application.options.inspect_timeout / 1000.0
        error = None
        try:
            engines = await IOLoop.current().run_in_executor(
                None, partial(list_engines, timeout=timeout))
        except Exception as e:  # the broker is down: the page still shows what Flower has
            log.warning("could not list the engines: %s", e)
            engines, error = [], "engines"
        try:
            queues = await self.get_broker().queues(self.get_active_queue_names())
        except Exception as e:
            log.warning("could not read the queues: %s", e)
            queues, error = [], "queues"
        served: dict[str, list[str]] = {}
        for engine in engines:
            for queue in (naming.MODEL_QUEUE_PREFIX + engine["model"],
                          naming.ENGINE_QUEUE_PREFIX + engine["engine_id"]):
                served.setdefault(queue, []).append(engine["engine_id"])
        return {"engines": [summary_row(e) for e in engines], "error": error,
                "queues": [(q["name"], q.get("messages"), served.get(q["name"]))
                           for q in queues]}

    def render_string(self, template_name: str, **kwargs: Any) -> bytes:
        page = bytes(super().render_string(template_name, **kwargs))
        if template_name != "workers.html" or self.summary is None:
            return page
        return insert(page, DASHBOARD_ANCHOR, TEMPLATES.load("flower_fleet.html").generate(
            prefix=url_prefix(self.application.options.url_prefix),
            model_prefix=naming.MODEL_QUEUE_PREFIX, **self.summary))


def insert(page: bytes, anchor: bytes, fragment: bytes) -> bytes:
    """``page`` with ``fragment`` before ``anchor`` (else before the end of its main part)."""
    at = page.find(anchor)
    if at < 0:
        at = page.find(FALLBACK_ANCHOR)
    return page + fragment if at < 0 else page[:at] + fragment + page[at:]


def url_prefix(prefix: str | None) -> str:
    """Flower's ``--url_prefix`` as the start of a path (``""`` or ``/flower``)."""
    return "/" + prefix.strip("/") if prefix and prefix.strip("/") else ""


def gpus_text(gpus: Any) -> str:
    """The engine's GPU ids, or ``CPU`` when it has none."""
    if isinstance(gpus, list | tuple):
        return ", ".join(str(g) for g in gpus) or "CPU"
    return str(gpus) if gpus else "CPU"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _text(key: str, engine: dict[str, Any]) -> str:
    value = engine[key]
    if value is None:
        return "\N{EM DASH}"
    if key == "gpus":
        return gpus_text(value)
    if key == "aliases":
        return ", ".join(value) or "\N{EM DASH}"
    if key == "uptime_s":
        return str(format_duration(value))
    if key == "kv_cache_usage" and isinstance(value, int | float):
        return f"{100 * value:.1f} %"
    if key == "idle_unload_s":
        return f"after {_count(value)} s ({engine.get('idle_mode') or 'unload'})"
    return _count(value)


#: The engine table's rows: report key and label, in the order an operator reads them.
ENGINE_FIELDS = [
    ("model", "Model"), ("aliases", "Served as"), ("engine_id", "Engine id"),
    ("engine", "Engine"), ("state", "State"), ("gpus", "GPUs"),
    ("cuda_visible_devices", "CUDA_VISIBLE_DEVICES"), ("in_flight", "Requests in flight"),
    ("running", "Running"), ("waiting", "Waiting"), ("max_running", "Most running at once"),
    ("kv_cache_usage", "KV cache in use"), ("requests_served", "Requests served"),
    ("tasks_failed", "Tasks failed"), ("tokens_generated", "Tokens generated"),
    ("loads", "Loads"), ("uptime_s", "Uptime"), ("max_model_len", "Max model len"),
    ("idle_unload_s", "Idle unload"), ("metrics_url", "Metrics"),
]
#: Keys shown within another row.
_FOLDED = {"idle_mode"}


def engine_rows(engine: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(label, text, link) for each key of the engine's report; keys it lacks (an older
    worker's) are left out, keys this table does not know come last as they are."""
    url = engine.get("metrics_url")
    link = url if isinstance(url, str) and urlparse(url).scheme in ("http", "https") else None
    rows: list[tuple[str, str, str | None]] = [
        (label, _text(key, engine), link if key == "metrics_url" else None)
        for key, label in ENGINE_FIELDS if key in engine]
    known = {key for key, _ in ENGINE_FIELDS} | _FOLDED
    rows += [(key, str(value), None) for key, value in engine.items() if key not in known]
    return rows


def summary_row(engine: dict[str, Any]) -> dict[str, str]:
    """One engine of the dashboard summary, as text."""
    row = {key: _text(key, engine) if key in engine else "\N{EM DASH}"
           for key in ("engine_id", "model", "gpus", "state", "in_flight", "running", "waiting",
                       "requests_served")}
    return {**row, "node": str(engine.get("node", "")), "state_key": str(engine.get("state"))}


#: The fleet's handlers, each ahead of Flower's route for the same path.
HANDLERS = [
    (r"/", FleetWorkersView),
    (r"/workers", FleetWorkersView),
    (r"/worker/(.+)", FleetWorkerView),
    (r"/broker", FleetBrokerView),
    (r"/api/queues/length", FleetQueueLengths),
]


def install() -> None:
    """Put the fleet's handlers ahead of Flower's routes.

    Flower's app takes its routes from this very list (``flower.app`` imported it by name) when
    it is built, and Tornado serves a path by its first matching route.
    """
    if urls.handlers[0] is not HANDLERS[0]:
        urls.handlers[:0] = HANDLERS


def main(argv: list[str] | None = None) -> None:
    """``celery -A producer flower <argv>`` with the fleet's handlers."""
    from celery.bin.celery import celery

    install()
    args = sys.argv[1:] if argv is None else argv
    celery.main(args=["-A", "producer", "flower", *args], prog_name="celery",
                auto_envvar_prefix="CELERY")


if __name__ == "__main__":
    main()
