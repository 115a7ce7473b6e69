"""Session fixtures: a private Redis, the tiny model, a fleet config, real fleet workers.

Each session starts its own redis-server on a free loopback port (with a password) and never
touches another Redis. Engines start a few times per session, not per test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import PROBE, Fleet, WorkerProc, project_env
from tests.required import require_module, require_program

VISIBILITY_TIMEOUT = 4
MAX_DELIVERIES = 2

EXTRA_MODELS = """
[models.tiny-b]
model = "{tiny}"
max_model_len = 512
dtype = "bfloat16"
enforce_eager = true
kv_cache_memory_bytes = 268435456
max_num_seqs = 256

[models.tiny-b.defaults]
max_tokens = 5

[models.tiny-idle]
model = "{tiny}"
max_model_len = 512
dtype = "bfloat16"
enforce_eager = true
kv_cache_memory_bytes = 268435456
idle_unload_s = 2

[models.tiny-faults]
model = "{tiny}"
max_model_len = 512
dtype = "bfloat16"
enforce_eager = true
kv_cache_memory_bytes = 268435456

[models.chaos]
model = "chaos"
engine = "fake"

[models.gw-fake]
model = "gw-fake"
engine = "fake"
served_model_name = ["test-org/gw-fake"]

[models.gw-slow]
model = "gw-slow"
engine = "fake"

[models.gw-none]
model = "gw-none"
engine = "fake"

[models.top-fake]
model = "top-fake"
engine = "fake"

[models.top-none]
model = "top-none"
engine = "fake"

[models.flower-fake]
model = "flower-fake"
engine = "fake"

[models.flower-none]
model = "flower-none"
engine = "fake"

[models.tiny-prio]
model = "{tiny}"
max_model_len = 512
dtype = "bfloat16"
enforce_eager = true
kv_cache_memory_bytes = 268435456
max_num_seqs = 256

[models.batch-fake]
model = "batch-fake"
engine = "fake"
max_tokens_cap = 64

[models.fleetobj-fake]
model = "fleetobj-fake"
engine = "fake"

[models.tiny-late]
model = "{tiny}"
max_model_len = 512
dtype = "bfloat16"
enforce_eager = true
kv_cache_memory_bytes = 268435456

[models.tiny-mix]
model = "{tiny}"
max_model_len = 512
dtype = "bfloat16"
enforce_eager = true
kv_cache_memory_bytes = 268435456
max_num_seqs = 256
tool_call_parser = "hermes"
structured_outputs_config = {{ backend = "xgrammar", disable_any_whitespace = true }}
"""


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    from producer.localredis import LocalRedis

    require_program("redis-server")
    with LocalRedis() as server:
        yield server


@pytest.fixture(scope="session")
def fleet_env(redis_server: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of this session's producers and workers (also applied to this process)."""
    from producer.settings import get_settings
    from workers.tiny_model import ensure_tiny_model

    root = tmp_path_factory.mktemp("fleet")
    cache = root / "cache"
    tiny = ensure_tiny_model(cache / "models" / "tiny")
    config = root / "fleet.toml"
    config.write_text(EXTRA_MODELS.format(tiny=tiny))
    values = {
        "FLEET_BROKER_URL": redis_server.url,
        "FLEET_CACHE_DIR": str(cache),
        "FLEET_CONFIG": str(config),
        "FLEET_WORKER_CONCURRENCY": "64",
        # Short, so the fault tests see redelivery within seconds (the default is 120 s).
        "FLEET_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
        "FLEET_MAX_DELIVERIES": str(MAX_DELIVERIES),
        # Every engine step's text goes out on its own, so the streaming tests see it piece
        # by piece on any machine (the interval itself: tests/test_gateway.py).
        "FLEET_STREAM_INTERVAL_S": "0",
    }
    os.environ.update(values)
    get_settings.cache_clear()
    return project_env(**values)


@pytest.fixture(scope="session")
def app(fleet_env: dict[str, str]) -> Any:
    from producer import app as celery_app
    from producer.celery_app import celery_config
    from producer.settings import get_settings

    # Collection may already have touched the app's (lazy) config: point it at this session.
    celery_app.conf.update(celery_config(get_settings()))
    assert celery_app.conf.broker_url == fleet_env["FLEET_BROKER_URL"]
    return celery_app


@pytest.fixture(scope="session")
def redis_client(redis_server: Any) -> Any:
    import redis

    return redis.Redis.from_url(redis_server.url)


@pytest.fixture(scope="session")
def tiny_dir(fleet_env: dict[str, str]) -> Path:
    return Path(fleet_env["FLEET_CACHE_DIR"]) / "models" / "tiny"


@pytest.fixture(scope="session")
def fleet(fleet_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    require_module("vllm")
    f = Fleet(fleet_env, tmp_path_factory.mktemp("logs"))
    yield f
    f.stop_all()


@pytest.fixture(scope="session")
def workers_ab(fleet: Fleet, app: Any) -> tuple[WorkerProc, WorkerProc]:
    """Engine a1 serving `tiny` with its /metrics on (vLLM's stat logging on) and engine b1
    serving `tiny-b` (pinned to GPU id 0) without, each with the engine probe
    (tests/engine_probe.py) loaded."""
    a = fleet.start("tiny", "a1", include=PROBE, env={"FLEET_METRICS_PORT": "0"})
    b = fleet.start("tiny-b", "b1", gpus="0", include=PROBE)
    fleet.wait_ready(app, a, b)
    return a, b
