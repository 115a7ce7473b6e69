"""The compose deployment only uses commands, options and variables the project accepts.

Docker cannot run here, so the file is parsed and each service is checked against the real
CLI parser and the real settings object.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.main import get_command

from producer.cli import cli
from producer.settings import FleetSettings

COMPOSE = Path(__file__).parent.parent / "compose"
VAR = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::?(?P<op>[-?])(?P<arg>[^}]*))?\}")


def _env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (COMPOSE / ".env.example").read_text().splitlines()
             if line.strip() and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def _interpolate(text: str, env: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"]
        if name in env:
            return env[name]
        if op == "-":
            return arg
        raise AssertionError(f"${{{name}}} is neither in .env.example nor defaulted")

    return VAR.sub(sub, text.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    text = (COMPOSE / "docker-compose.yml").read_text()
    return yaml.safe_load(_interpolate(text, _env_example()))


def _fleet_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items()
            if svc.get("command", [None])[0] == "fleet"}


def test_every_env_example_variable_is_used_and_every_used_one_is_defined() -> None:
    text = (COMPOSE / "docker-compose.yml").read_text()
    used = {m["name"] for m in VAR.finditer(text)}
    assert set(_env_example()) <= used
    _interpolate(text, _env_example())  # raises on an undefined, undefaulted variable


def test_fleet_commands_parse_with_the_real_cli(compose: dict[str, Any]) -> None:
    group = get_command(cli)
    services = _fleet_services(compose)
    assert {"worker-llama-0", "worker-qwen-1", "flower", "gateway"} <= set(services)
    for name, svc in services.items():
        _, sub, *args = svc["command"]
        ctx = group.make_context("fleet", [sub, *args])
        command = group.get_command(ctx, sub)  # type: ignore[attr-defined]
        assert command is not None, f"{name}: unknown subcommand {sub}"
        command.make_context(sub, list(args), parent=ctx)  # raises on a bad option


def test_every_worker_has_a_health_check_of_its_own_engine(compose: dict[str, Any]) -> None:
    group = get_command(cli)
    for name, svc in _fleet_services(compose).items():
        if svc["command"][1] != "worker":
            continue
        engine_id = svc["command"][svc["command"].index("--engine-id") + 1]
        check = svc.get("healthcheck", {})
        assert check.get("test") == ["CMD", "fleet", "health", engine_id], name
        assert check["start_period"] and check["interval"] and check["retries"]
        ctx = group.make_context("fleet", ["health", engine_id])
        command = group.get_command(ctx, "health")  # type: ignore[attr-defined]
        assert command is not None
        command.make_context("health", [engine_id], parent=ctx)


def test_fleet_variables_are_settings_the_project_reads(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fields = {f"FLEET_{name.upper()}" for name in FleetSettings.model_fields}
    config = COMPOSE / "fleet.example.toml"
    for name, svc in _fleet_services(compose).items():
        env = {k: str(v) for k, v in svc["environment"].items()}
        unknown = {k for k in env if k.startswith("FLEET_")} - fields
        assert not unknown, f"{name}: unknown settings {unknown}"
        for key in [k for k in list(__import__("os").environ) if k.startswith("FLEET_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("FLEET_CONFIG", str(config))  # the file mounted at /etc/fleet
        settings = FleetSettings()
        assert settings.broker_url.startswith("redis://:")  # with the password
        command = svc["command"]
        if command[1] == "worker":
            model = command[command.index("--model") + 1]
            if settings.model(model).engine == "openai":  # a remote engine: no GPU here
                assert "--gpus" not in command and "deploy" not in svc, name
                continue
            gpus = command[command.index("--gpus") + 1].split(",")
            devices = svc["deploy"]["resources"]["reservations"]["devices"][0]
            assert "gpu" in devices["capabilities"]
            # The container sees its reserved GPUs as 0..n-1, whatever their host ids: a
            # worker given the host ids (1,2) would find one GPU and refuse tensor parallel 2.
            assert gpus == [str(i) for i in range(len(devices["device_ids"]))], name
            tp = settings.model(model).tensor_parallel_size
            assert tp in (None, len(gpus))


def test_every_fleet_service_mounts_the_config_file_it_names(compose: dict[str, Any]) -> None:
    # Every fleet command reads the settings, and a FLEET_CONFIG naming no file is a ConfigError.
    for name, svc in _fleet_services(compose).items():
        config = svc["environment"].get("FLEET_CONFIG")
        if config is None:
            continue
        targets = [str(v).split(":")[1] for v in svc.get("volumes", [])]
        assert config in targets, f"{name}: FLEET_CONFIG {config} is not mounted"


def test_redis_has_password_aof_and_no_eviction(compose: dict[str, Any]) -> None:
    command = compose["services"]["redis"]["command"]
    assert "--requirepass" in command
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


def test_flower_is_behind_auth_and_published_on_loopback(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    assert flower["environment"]["FLEET_FLOWER_USER"]
    assert flower["environment"]["FLEET_FLOWER_PASSWORD"]
    assert all(str(p).startswith("127.0.0.1:") for p in flower["ports"])


def test_gateway_is_behind_keys_published_on_loopback_and_health_checked(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = compose["services"]["gateway"]
    command = gateway["command"]
    assert command[:2] == ["fleet", "gateway"] and "--insecure" not in command
    # All interfaces inside the container; the host publishes it on its loopback only.
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert gateway["ports"] and all(str(p).startswith("127.0.0.1:") for p in gateway["ports"])
    for key in [k for k in list(__import__("os").environ) if k.startswith("FLEET_")]:
        monkeypatch.delenv(key)
    for key, value in gateway["environment"].items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setenv("FLEET_CONFIG", str(COMPOSE / "fleet.example.toml"))
    settings = FleetSettings()
    assert settings.gateway_api_keys  # it refuses to start without keys
    published = {str(p).rsplit(":", 1)[1] for p in gateway["ports"]}
    assert published == {str(settings.gateway_port)}
    # The health check asks the gateway's own /health, with a tool the image has.
    check = gateway["healthcheck"]
    test = " ".join(check["test"])
    assert check["test"][:2] == ["CMD", "python3"]
    assert f"http://127.0.0.1:{settings.gateway_port}/health" in test
    assert check["interval"] and check["retries"]


def _workers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in _fleet_services(compose).items()
            if svc["command"][1] == "worker"}


def test_prometheus_scrapes_every_worker_and_the_gateway(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    jobs = {job["job_name"]: {t for sc in job["static_configs"] for t in sc["targets"]}
            for job in config["scrape_configs"]}
    workers = _workers(compose)
    assert workers
    for svc in workers.values():
        env = svc["environment"]
        # Listening inside the compose network, published nowhere.
        assert env["FLEET_METRICS_ADDRESS"] == "0.0.0.0"
        assert not any(str(p).endswith(f":{env['FLEET_METRICS_PORT']}")
                       for p in svc.get("ports", []))
    assert jobs["fleet-workers"] == {f"{name}:{svc['environment']['FLEET_METRICS_PORT']}"
                                     for name, svc in workers.items()}
    gateway_port = compose["services"]["gateway"]["environment"]["FLEET_GATEWAY_PORT"]
    assert jobs["fleet-gateway"] == {f"gateway:{gateway_port}"}
    prometheus = compose["services"]["prometheus"]
    assert any(v.startswith("./prometheus.yml:") for v in prometheus["volumes"])
    assert all(str(p).startswith("127.0.0.1:") for p in prometheus["ports"])


def dashboard_metrics() -> dict[str, set[str]]:
    """The metric names the Grafana dashboard asks for, by the scrape job they come from."""
    dashboard = json.loads((COMPOSE / "grafana" / "dashboards" / "fleet.json").read_text())
    by_job: dict[str, set[str]] = {"fleet-workers": set(), "fleet-gateway": set()}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name in re.findall(r"\b(vllm:[a-z_:]+|fleet_[a-z_]+)(?=[{\[)\s])", expr):
                name = re.sub(r"_(bucket|count|sum)$", "", name)
                gateway = 'job="fleet-gateway"' in expr or name.startswith("fleet_gateway_")
                by_job["fleet-gateway" if gateway else "fleet-workers"].add(name)
    return by_job


def test_grafana_is_provisioned_with_the_fleet_dashboard(compose: dict[str, Any]) -> None:
    from producer.gateway.metrics import Metrics

    grafana = compose["services"]["grafana"]
    assert all(str(p).startswith("127.0.0.1:") for p in grafana["ports"])
    env = grafana["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"] and env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"]
                  if v.startswith("./"))
    assert mounts["./grafana/dashboards"] == "/var/lib/grafana/dashboards"
    provider = yaml.safe_load(
        (COMPOSE / "grafana/provisioning/dashboards/fleet.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == mounts["./grafana/dashboards"]
    source = yaml.safe_load(
        (COMPOSE / "grafana/provisioning/datasources/prometheus.yml").read_text())
    source = source["datasources"][0]
    assert source["url"] == "http://prometheus:9090"
    dashboard = json.loads((COMPOSE / "grafana/dashboards/fleet.json").read_text())
    assert {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]} == {
        source["uid"]}
    # The gateway's metrics the dashboard reads are the ones it exports (the workers' are
    # checked against a live worker in tests/test_metrics.py).
    exported = {m.name for m in Metrics().registry.collect()}  # counters without _total
    assert {re.sub(r"_total$", "", n) for n in dashboard_metrics()["fleet-gateway"]} <= exported
