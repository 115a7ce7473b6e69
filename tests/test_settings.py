"""Settings: environment, the TOML fleet config, the embedded tiny model, naming."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from producer import naming
from producer.errors import UnknownModel
from producer.settings import FleetSettings
from workers.pinning import parse_gpus, pin_gpus


def test_toml_config_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text(
        'broker_url = "redis://file:1/0"\n'
        "[models.big]\n"
        'model = "org/big"\n'
        "tensor_parallel_size = 2\n"
        'hf_overrides = { rope_scaling = { rope_type = "yarn", factor = 2.0 } }\n'
        "[models.big.defaults]\n"
        "temperature = 0.2\n"
    )
    monkeypatch.setenv("FLEET_CONFIG", str(config))
    monkeypatch.setenv("FLEET_BROKER_URL", "redis://env:2/0")
    settings = FleetSettings()
    assert settings.broker_url == "redis://env:2/0"  # environment wins over the file
    big = settings.model("big")
    assert big.tensor_parallel_size == 2
    assert big.trust_remote_code is False
    assert big.hf_overrides["rope_scaling"]["factor"] == 2.0
    assert big.defaults.temperature == 0.2
    assert settings.model("tiny").model.endswith("models/tiny")  # embedded default still there
    with pytest.raises(UnknownModel, match="model 'nope' is not configured"):
        settings.model("nope")


def test_models_from_json_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEET_CONFIG", raising=False)
    monkeypatch.setenv("FLEET_MODELS", '{"m1": {"model": "/w", "max_model_len": 1024}}')
    assert FleetSettings().model("m1").max_model_len == 1024


def test_bad_model_config_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEET_CONFIG", raising=False)
    monkeypatch.setenv("FLEET_MODELS", '{"m1": {"model": "/w", "gpu_memory_utilization": 2}}')
    with pytest.raises(ValidationError) as info:
        FleetSettings()
    assert [e["loc"] for e in info.value.errors()] == [("models", "m1", "gpu_memory_utilization")]


def test_queue_and_node_names() -> None:
    assert naming.model_queue("tiny") == "fleet.model.tiny"
    assert naming.engine_queue("a1") == "fleet.engine.a1"
    assert naming.node_name("a1", "host") == "a1@host"
    with pytest.raises(ValueError):
        naming.model_queue("bad name")


def test_gpu_pinning_sets_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    with monkeypatch.context() as env:
        # Set first, so the context restores the variable even where it was unset (delenv
        # of an unset variable records nothing to restore); else every later worker this
        # session starts would inherit the pinning.
        env.setenv("CUDA_VISIBLE_DEVICES", "unpinned")
        env.delenv("CUDA_VISIBLE_DEVICES")
        pin_gpus(parse_gpus(" 2, 3 "))
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before
    assert parse_gpus("") == []
    with pytest.raises(ValueError):
        parse_gpus("zero")
