"""``fleet batch run``: OpenAI batch files through real workers.

The mechanics (mixed lines, order, resume after kill -9, cancel, --retry-failed) run on a
fake-engine worker (``batch-fake``), where a job of thousands of lines takes seconds; the
format is then checked end to end on the real engine (worker a1 of ``tiny``), read back with the
``openai`` SDK's own types.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producer.gateway.batchfile import recover, run_batch
from tests.harness import Fleet, WorkerProc, wait_until

MODEL = "batch-fake"
HELLO = [{"role": "user", "content": "hello batch world"}]


def chat_line(i: int, **body: Any) -> dict[str, Any]:
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": f"line {i} says hi"}],
                     "max_tokens": 4, **body}}


def write_lines(path: Path, lines: list[Any]) -> Path:
    with path.open("w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def fake_worker(fleet_env: dict[str, str], app: Any,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProc]:
    fleet = Fleet(fleet_env, tmp_path_factory.mktemp("batch-logs"))
    worker = fleet.start(MODEL, "batchfake1")
    fleet.wait_ready(app, worker)
    yield worker
    fleet.stop_all()


def batch_cli(fleet_env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    # Ctrl-C as a terminal sends it: a test session started in the background (a shell without
    # job control ignores SIGINT there) would pass the ignoring on, and Python keeps it.
    return subprocess.Popen([sys.executable, "-m", "producer.cli", "batch", "run", *args],
                            env=fleet_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_mixed_valid_and_invalid_lines(fake_worker: WorkerProc, tmp_path: Path) -> None:
    lines: list[Any] = [
        chat_line(0),
        "{not json",
        {"custom_id": "no-url", "method": "POST", "url": "/v1/embeddings", "body": {}},
        chat_line(3, temperature=7000),
        {"custom_id": "cmpl", "method": "POST", "url": "/v1/completions",
         "body": {"model": MODEL, "prompt": ["one two", "three four five"], "max_tokens": 2}},
        chat_line(5, max_tokens=1000),  # above the model's cap of 64: refused by the worker
        {"custom_id": "model", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "not a model id!", "messages": HELLO}},
        chat_line(0),  # a custom_id given twice: the second is not run
        "",
        chat_line(9),
    ]
    source = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    summary = run_batch(source, out, ordered=True)
    got = read_lines(out)
    assert [g["custom_id"] for g in got] == [
        "req-0", None, "no-url", "req-3", "cmpl", "req-5", "model", "req-9"]
    status = {g["custom_id"]: g["response"]["status_code"] for g in got}
    assert status == {"req-0": 200, None: 400, "no-url": 400, "req-3": 400, "cmpl": 200,
                      "req-5": 400, "model": 400, "req-9": 200}
    errors = {g["custom_id"]: g["response"]["body"]["error"] for g in got
              if g["response"]["status_code"] != 200}
    assert errors["no-url"]["param"] == "url"
    assert errors["req-3"]["param"] == "temperature"
    assert "max_tokens" in errors["req-5"]["message"]
    assert errors["model"]["param"] == "model"
    assert errors[None]["message"].startswith("line 2: ")
    assert got[0]["response"]["body"]["choices"][0]["message"]["content"] == "line 0 says hi"
    assert [c["text"] for c in got[4]["response"]["body"]["choices"]] == ["one two",
                                                                          "three four"]
    assert (summary.total, summary.succeeded, summary.duplicates) == (9, 3, 1)
    assert summary.failed == {400: 5}
    assert summary.done == summary.total


#: Lines of the jobs stopped mid-way.
LONG = 20_000


def long_job_under_way(fleet_env: dict[str, str], tmp_path: Path
                       ) -> tuple[subprocess.Popen[str], Path, Path]:
    """The CLI on LONG lines, once part of the results is written."""
    source = write_lines(tmp_path / "in.jsonl", [chat_line(i) for i in range(LONG)])
    out = tmp_path / "out.jsonl"
    run = batch_cli(fleet_env, str(source), "-o", str(out), "--chunk-size", "64")
    wait_until(lambda: out.exists() and out.stat().st_size > 100_000, 120,
               "a part of the results")
    return run, source, out


def finish_and_check_each_once(fleet_env: dict[str, str], source: Path, out: Path) -> str:
    """Run the job again to its end; every custom_id has exactly one line."""
    finished = batch_cli(fleet_env, str(source), "-o", str(out))
    _, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err
    ids = Counter(g["custom_id"] for g in read_lines(out))
    assert len(ids) == LONG and set(ids.values()) == {1}  # none lost, none twice
    return err


def test_kill_9_mid_job_then_resume_loses_nothing_and_writes_nothing_twice(
        fake_worker: WorkerProc, fleet_env: dict[str, str], tmp_path: Path) -> None:
    run, source, out = long_job_under_way(fleet_env, tmp_path)
    run.send_signal(signal.SIGKILL)
    run.wait()
    written = out.read_bytes()
    assert 0 < written.count(b"\n") < LONG  # killed mid-job
    with out.open("ab") as f:
        f.write(b'{"id": "batch_req_partial", "custom_id": "req-')  # a torn last line
    err = finish_and_check_each_once(fleet_env, source, out)
    assert "skipped" in err and "finished" in err


def test_ctrl_c_cancels_what_is_in_flight_and_prints_the_resume_command(
        fake_worker: WorkerProc, fleet_env: dict[str, str], tmp_path: Path) -> None:
    run, source, out = long_job_under_way(fleet_env, tmp_path)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert "cancelled" in err and f"resume with: fleet batch run {source} -o {out}" in err
    kept = Counter(g["custom_id"] for g in read_lines(out))
    assert 0 < len(kept) < LONG and set(kept.values()) == {1}
    finish_and_check_each_once(fleet_env, source, out)


def test_retry_failed_sends_error_lines_again_and_keeps_one_line_each(
        fake_worker: WorkerProc, tmp_path: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", [chat_line(i) for i in range(4)])
    out = tmp_path / "out.jsonl"
    errors = tmp_path / "errors.jsonl"
    # An earlier run: req-0 succeeded, req-1 failed (the engine was lost), the rest never ran.
    write_lines(out, [{"id": "batch_req_a", "custom_id": "req-0", "error": None,
                       "response": {"status_code": 200, "request_id": "a", "body": {}}}])
    write_lines(errors, [{"id": "batch_req_b", "custom_id": "req-1", "error": None,
                          "response": {"status_code": 503, "request_id": "b",
                                       "body": {"error": {"message": "engine lost"}}}}])
    again = run_batch(source, out, errors_path=errors)
    assert (again.skipped, again.succeeded) == (2, 2)  # req-1's error line stands
    assert len(read_lines(errors)) == 1
    retried = run_batch(source, out, errors_path=errors, retry_failed=True)
    assert (retried.skipped, retried.succeeded) == (3, 1)
    assert read_lines(errors) == []
    ids = Counter(g["custom_id"] for g in read_lines(out))
    assert ids == {"req-0": 1, "req-1": 1, "req-2": 1, "req-3": 1}


def test_a_partial_last_line_is_cut_off_on_resume(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"custom_id": "a", "response": {"status_code": 200}, "error": null}\n'
                    b'{"custom_id": "b", "resp')
    assert recover(out, out, retry_failed=False) == {hash("a")}
    assert out.read_bytes().endswith(b"null}\n")


@pytest.mark.engine
def test_a_batch_file_on_the_real_engine_reads_back_as_the_sdks_types(
        workers_ab: Any, fleet_env: dict[str, str], tmp_path: Path) -> None:
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    lines = []
    for i in range(40):
        lines.append({"custom_id": f"chat-{i}", "method": "POST",
                      "url": "/v1/chat/completions",
                      "body": {"model": "tiny", "max_tokens": 8, "temperature": 0,
                               "messages": [{"role": "user", "content": f"question {i}"}]}})
        lines.append({"custom_id": f"text-{i}", "method": "POST", "url": "/v1/completions",
                      "body": {"model": "tiny", "prompt": f"once upon {i}", "max_tokens": 8,
                               "temperature": 0, "ignore_eos": True}})
    source = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    run = batch_cli(fleet_env, str(source), "-o", str(out), "--ordered")
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    got = read_lines(out)
    assert [g["custom_id"] for g in got] == [line["custom_id"] for line in lines]
    for g in got:
        assert g["error"] is None and g["response"]["status_code"] == 200
        body = g["response"]["body"]
        if g["custom_id"].startswith("chat-"):
            chat = ChatCompletion.model_validate(body)
            assert chat.choices[0].message.role == "assistant" and chat.model == "tiny"
        else:
            text = Completion.model_validate(body)
            assert text.usage is not None and text.usage.completion_tokens == 8
    assert "succeeded 80" in err and time.monotonic() - started < 300


def test_progress_lines_and_summary_off_a_terminal() -> None:
    import io

    from producer.batchview import ProgressView, summary_text
    from producer.gateway.batchfile import Summary

    stream = io.StringIO()
    s = Summary(total=100, succeeded=40, failed={400: 2}, skipped=8, completion_tokens=1280,
                wall_s=2.0, output="out.jsonl", errors="out.jsonl")
    with ProgressView(stream, terminal=False) as view:
        view(s)
        view(s)  # within PLAIN_EVERY_S: no second line
    assert stream.getvalue() == ("batch: 50/100 done, 2 failed, 21.0 req/s, 640 tok/s, "
                                 "elapsed 0:00:02, ETA 0:00:02\n")
    text = summary_text(s)
    assert "succeeded 40, failed 2 (2 x 400), skipped 8" in text
    assert "tokens: 0 in, 1280 out" in text and "error lines: in out.jsonl" in text
