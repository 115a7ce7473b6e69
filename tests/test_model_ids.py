"""Model ids as people write them (``Qwen/Qwen3-8B``) and their aliases; engine ids stay plain."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from producer import InvalidRequest, engine_status, generate, naming
from producer.cli import default_engine_id
from producer.errors import ConfigError, UnknownModel
from producer.schema import GenerateRequest, StatusRequest, parse
from producer.settings import FleetSettings, read_settings
from tests.field_errors import assert_names_field
from tests.redis_traffic import nothing_sent, published

HF_ID = "Qwen/Qwen3-8B"
NOT_MODEL_IDS = ["a/b/c", "/name", "org/", "org//name", "org/ name", "-org/name", "org/.name",
                 "tiny\n", "", "x" * 129, "org/" + "x" * 129]


@pytest.fixture
def no_fleet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings from what the test sets only, not the session's FLEET_ variables and file."""
    for name in [name for name in os.environ if name.startswith("FLEET_")]:
        monkeypatch.delenv(name)


def test_a_hugging_face_id_names_its_queues() -> None:
    assert naming.check_model_id(HF_ID) == HF_ID
    assert naming.model_queue(HF_ID) == "fleet.model.Qwen/Qwen3-8B"
    assert naming.dead_letter_queue(HF_ID) == "fleet.dead.Qwen/Qwen3-8B"
    assert naming.model_queue("x" * 128 + "/" + "y" * 128)  # each part as long as a plain id


@pytest.mark.parametrize("bad", NOT_MODEL_IDS)
def test_anything_else_is_not_a_model_id(bad: str) -> None:
    with pytest.raises(ValueError, match=r"model id .* must match"):
        naming.model_queue(bad)
    assert naming.dead_letter_queue(bad) == "fleet.dead.unknown"


def test_engine_ids_refuse_a_slash() -> None:
    with pytest.raises(ValueError, match="engine id 'Qwen/Qwen3-8B' must match"):
        naming.engine_queue(HF_ID)
    with pytest.raises(ValueError, match="engine id"):
        naming.node_name(HF_ID, "host")
    with pytest.raises(ValueError, match="engine id"):
        naming.check_id("a1\n", what="engine id")


def test_requests_take_a_hugging_face_id_and_status_requests_a_plain_engine_id() -> None:
    assert GenerateRequest.model_validate({"prompt": "hi", "model": HF_ID}).model == HF_ID
    for bad in NOT_MODEL_IDS:
        with pytest.raises(InvalidRequest) as info:
            parse(GenerateRequest, {"prompt": "hi", "model": bad})
        assert_names_field(info.value, "model")
    assert parse(StatusRequest, {"engine_id": "Qwen-Qwen3-8B-host"}).engine_id
    with pytest.raises(InvalidRequest) as status:
        parse(StatusRequest, {"engine_id": HF_ID})
    assert_names_field(status.value, "engine_id")


def test_engine_status_refuses_a_model_id_as_engine_id(app: Any) -> None:
    with nothing_sent(), pytest.raises(InvalidRequest) as info:
        engine_status.delay(HF_ID)
    assert_names_field(info.value, "engine_id")


def test_a_task_for_a_hugging_face_id_reaches_a_consumer_of_its_queue(
    app: Any, redis_client: Any
) -> None:
    queue_name = naming.model_queue("test-org/model-" + os.urandom(4).hex())
    model = queue_name.removeprefix(naming.MODEL_QUEUE_PREFIX)
    with published() as keys:
        result = generate.delay("hello", model=model, max_tokens=3)
    assert keys == [queue_name]
    # Declared the way a worker adds its model queue (Celery's add_task_queue), read with the
    # fleet's transport.
    queue = app.amqp.queues[queue_name]
    got: list[Any] = []
    conn = Connection(app.conf.broker_url, transport="producer.transport:Transport")
    consumer = conn.Consumer([queue], callbacks=[lambda body, message: got.append(message)],
                             accept=["json"])
    consumer.consume()
    try:
        conn.drain_events(timeout=5)
        assert len(got) == 1
        assert got[0].headers["id"] == result.id
        assert json.loads(got[0].body)[1]["model"] == model
        got[0].ack()
    finally:
        conn.release()
        result.forget()
        redis_client.delete(queue_name)


MODELS = {
    HF_ID: {"model": "/w/qwen3-8b", "served_model_name": ["qwen", "qwen3", HF_ID]},
    "meta-llama/Llama-3.1-8B-Instruct": {"model": "/w/llama", "served_model_name": ["llama"]},
    "plain": {"model": "/w/plain"},
}


def test_aliases_resolve_to_their_model_id(no_fleet_env: None) -> None:
    settings = FleetSettings(models=MODELS)
    assert settings.model(HF_ID).served_model_name == ["qwen", "qwen3", HF_ID]
    assert settings.model("plain").served_model_name == []
    for name, model_id in [("qwen", HF_ID), ("qwen3", HF_ID), (HF_ID, HF_ID),
                           ("llama", "meta-llama/Llama-3.1-8B-Instruct"), ("plain", "plain"),
                           ("tiny", "tiny")]:
        assert settings.resolve_model(name) == model_id
    with pytest.raises(UnknownModel) as info:
        settings.resolve_model("Qwen/Qwen3-9B")
    assert str(info.value) == (
        "model 'Qwen/Qwen3-9B' is not configured (known: ['Qwen/Qwen3-8B', "
        "'meta-llama/Llama-3.1-8B-Instruct', 'plain', 'tiny'])")


def test_a_fleet_config_takes_a_hugging_face_id(
    tmp_path: Path, no_fleet_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text('[models."Qwen/Qwen3-8B"]\nmodel = "/w"\nserved_model_name = ["qwen"]\n')
    monkeypatch.setenv("FLEET_CONFIG", str(config))
    settings = read_settings()
    assert settings.model(HF_ID).model == "/w"
    assert settings.resolve_model("qwen") == HF_ID


CLASHES = [
    # (the second model's aliases, what the error says)
    (["Qwen/Qwen3-8B"], "served_model_name 'Qwen/Qwen3-8B' of model 'other' is already the id "
                        "of model 'Qwen/Qwen3-8B'"),
    (["qwen"], "served_model_name 'qwen' of model 'other' is already an alias of model "
               "'Qwen/Qwen3-8B'"),
    (["tiny"], "served_model_name 'tiny' of model 'other' is already the id of model 'tiny'"),
]


@pytest.mark.parametrize(("aliases", "says"), CLASHES, ids=["an-id", "an-alias", "tiny"])
def test_a_name_of_two_models_is_refused_when_the_settings_are_read(
    aliases: list[str], says: str, no_fleet_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {HF_ID: {"model": "/w", "served_model_name": ["qwen"]},
              "other": {"model": "/o", "served_model_name": aliases}}
    monkeypatch.setenv("FLEET_MODELS", json.dumps(models))
    with pytest.raises(ConfigError) as info:
        read_settings()
    assert str(info.value).startswith(f"invalid fleet settings: FLEET_MODELS: models: {says}")


def test_an_alias_must_be_a_model_id(no_fleet_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_MODELS", '{"m": {"model": "/w", "served_model_name": ["a b"]}}')
    with pytest.raises(ConfigError, match=r"models\.m\.served_model_name\.0: model id 'a b' must"):
        read_settings()


def test_fleet_worker_makes_a_plain_engine_id_of_a_hugging_face_id() -> None:
    assert default_engine_id(HF_ID, "gpu-1.example.com") == "Qwen-Qwen3-8B-gpu-1"
    assert default_engine_id("tiny", "host") == "tiny-host"
    for model in (HF_ID, "meta-llama/Llama-3.1-8B-Instruct", "tiny"):
        engine_id = default_engine_id(model, "h.example.com")
        assert naming.check_id(engine_id, what="engine id") == engine_id
