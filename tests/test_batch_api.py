"""OpenAI's Batch API on the gateway, through the ``openai`` SDK, against a fake-engine worker:
upload to downloaded results, a cancelled batch, and a batch that outlives its gateway."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import GATEWAY_KEY, Fleet, GatewayProc, start_gateway, wait_until
from tests.required import require_module

MODEL = "batch-fake"


def line(i: int, **body: Any) -> str:
    return json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": MODEL, "max_tokens": 4, **body,
                                "messages": [{"role": "user", "content": f"line {i} hi"}]}})


@pytest.fixture(scope="module")
def worker_fleet(fleet_env: dict[str, str], app: Any,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(fleet_env, tmp_path_factory.mktemp("batch-api-logs"))
    fleet.wait_ready(app, fleet.start(MODEL, "batchapi1"))
    yield fleet
    fleet.stop_all()


@pytest.fixture
def files_env(fleet_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {**fleet_env, "FLEET_GATEWAY_FILES_DIR": str(tmp_path / "gateway-files")}


def sdk(gateway: GatewayProc) -> Any:
    require_module("openai")
    import openai

    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=GATEWAY_KEY, max_retries=0)


def upload(client: Any, path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    with path.open("rb") as f:
        return str(client.files.create(file=f, purpose="batch").id)


def wait_status(client: Any, batch_id: str, statuses: set[str], timeout: float) -> Any:
    found: list[Any] = []

    def reached() -> bool:
        found[:] = [client.batches.retrieve(batch_id)]
        return found[0].status in statuses

    wait_until(reached, timeout, f"batch {batch_id} to reach {statuses}", interval=0.2)
    return found[0]


def test_upload_create_poll_download(worker_fleet: Fleet, files_env: dict[str, str],
                                     tmp_path: Path) -> None:
    from openai.types.chat import ChatCompletion

    gateway = start_gateway(files_env, worker_fleet.logdir, "gateway-batch-api")
    try:
        client = sdk(gateway)
        file_id = upload(client, tmp_path / "in.jsonl",
                         [line(i) for i in range(300)] + [line(300, temperature=7000)])
        assert client.files.retrieve(file_id).bytes == (tmp_path / "in.jsonl").stat().st_size
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                      completion_window="24h", metadata={"job": "test"})
        assert batch.status in ("validating", "in_progress")
        done = wait_status(client, batch.id, {"completed", "failed"}, 120)
        assert done.status == "completed", done
        assert done.request_counts.total == 301
        assert (done.request_counts.completed, done.request_counts.failed) == (300, 1)
        assert done.metadata == {"job": "test"} and done.completed_at is not None
        out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
        assert Counter(o["custom_id"] for o in out) == Counter(f"req-{i}" for i in range(300))
        ChatCompletion.model_validate(out[0]["response"]["body"])
        errors = [json.loads(x) for x in
                  client.files.content(done.error_file_id).text.splitlines()]
        assert [e["custom_id"] for e in errors] == ["req-300"]
        assert errors[0]["response"]["body"]["error"]["param"] == "temperature"
        assert batch.id in [b.id for b in client.batches.list()]
        import openai

        with pytest.raises(openai.BadRequestError) as bad:
            client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings",
                                  completion_window="24h")
        assert bad.value.body["param"] == "endpoint"
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve("batch_nope")
    finally:
        gateway.stop()


def test_a_cancelled_batch_keeps_what_is_done(worker_fleet: Fleet, files_env: dict[str, str],
                                              tmp_path: Path) -> None:
    gateway = start_gateway(files_env, worker_fleet.logdir, "gateway-batch-cancel")
    try:
        client = sdk(gateway)
        file_id = upload(client, tmp_path / "in.jsonl", [line(i) for i in range(50_000)])
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed > 0, 60,
                   "the batch to be under way", interval=0.2)
        assert client.batches.cancel(batch.id).status == "cancelling"
        done = wait_status(client, batch.id, {"cancelled"}, 60)
        assert done.cancelled_at is not None
        assert 0 < done.request_counts.completed < 50_000
        out = client.files.content(done.output_file_id).text.splitlines()
        ids = Counter(json.loads(x)["custom_id"] for x in out)
        assert set(ids.values()) == {1} and len(ids) < 50_000
    finally:
        gateway.stop()


def test_a_batch_outlives_its_gateway(worker_fleet: Fleet, files_env: dict[str, str],
                                      tmp_path: Path) -> None:
    first = start_gateway(files_env, worker_fleet.logdir, "gateway-batch-first")
    n = 30_000
    try:
        client = sdk(first)
        file_id = upload(client, tmp_path / "in.jsonl", [line(i) for i in range(n)])
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed > 1000,
                   60, "the batch to be under way", interval=0.2)
    finally:
        first.process.send_signal(signal.SIGKILL)  # no shutdown: the batch is left mid-way
        first.process.wait()
    second = start_gateway(files_env, worker_fleet.logdir, "gateway-batch-second")
    try:
        client = sdk(second)
        started = time.monotonic()
        done = wait_status(client, batch.id, {"completed", "failed"}, 180)
        assert done.status == "completed", done
        assert done.request_counts.completed == n and time.monotonic() - started < 180
        out = client.files.content(done.output_file_id).text.splitlines()
        ids = Counter(json.loads(x)["custom_id"] for x in out)
        assert len(ids) == n and set(ids.values()) == {1}  # resumed: none lost, none twice
    finally:
        second.stop()
