"""Remote engines: a fleet worker whose engine is vLLM's own OpenAI-compatible server.

The server is the real ``python -m vllm.entrypoints.openai.api_server`` on the tiny model (with
its hermes tool parser and a key); the worker of model ``tiny-mix`` is switched to it by the
environment (``FLEET_MODELS``, merged over the session's config file, where ``tiny-mix`` is a
local vLLM engine), as an operator switches a model between local and remote.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from celery.exceptions import TaskRevokedError
from jsonschema import Draft202012Validator

from producer import chat, generate
from producer.engines import health, list_engines
from producer.errors import InvalidRequest, PromptTooLong
from producer.localredis import free_port
from tests.harness import (
    SERVER_KEY,
    SERVER_KEY_ENV,
    Fleet,
    VllmServer,
    WorkerProc,
    result_of,
    wait_until,
)

pytestmark = pytest.mark.engine

MODEL = "tiny-mix"
QUEUE = f"fleet.model.{MODEL}"
TIMEOUT = 120
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def remote_env(server: VllmServer, key: str = SERVER_KEY) -> dict[str, str]:
    """The switch: model tiny-mix served by the server, its key in SERVER_KEY_ENV."""
    switch = {MODEL: {"engine": "openai", "base_url": server.base_url,
                      "api_key_env": SERVER_KEY_ENV, "remote_model": server.served_name,
                      "health_interval_s": 0.5}}
    return {"FLEET_MODELS": json.dumps(switch), SERVER_KEY_ENV: key}


@pytest.fixture(scope="module")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    vllm_server = VllmServer(tiny_dir, free_port(),
                             tmp_path_factory.mktemp("server") / "vllm-server.log")
    vllm_server.start()
    yield vllm_server
    vllm_server.stop()


@pytest.fixture(scope="module")
def remote(fleet: Fleet, app: Any, server: VllmServer) -> Iterator[WorkerProc]:
    worker = fleet.start(MODEL, "r1", env=remote_env(server))
    fleet.wait_ready(app, worker)
    yield worker
    fleet.stop(worker)


def consumes(app: Any, node: str) -> bool:
    queues = app.control.inspect(destination=[node], timeout=1.0).active_queues() or {}
    return QUEUE in {q["name"] for q in queues.get(node, [])}


def direct(server: VllmServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The server's own answer, asked straight."""
    request = urllib.request.Request(
        server.base_url + path, data=json.dumps({"model": "tiny", **body}).encode(),
        headers={"Authorization": f"Bearer {SERVER_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        answer: dict[str, Any] = json.load(r)
        return answer


def test_generate_and_chat_are_the_servers_answers(
    remote: WorkerProc, server: VllmServer, app: Any
) -> None:
    result = generate.delay("Once upon a time", model=MODEL, max_tokens=12, temperature=0.0,
                            logprobs=2).get(timeout=TIMEOUT)
    same = direct(server, "/completions", {"prompt": "Once upon a time", "max_tokens": 12,
                                            "temperature": 0.0})
    assert result["engine_id"] == "r1" and result["model"] == MODEL
    assert result["text"] == same["choices"][0]["text"]
    assert result["prompt_tokens"] == same["usage"]["prompt_tokens"]
    assert result["completion_tokens"] == 12 and result["finish_reason"] == "length"
    assert len(result["logprobs"]) == 12
    assert all(len(t["top_logprobs"]) >= 2 and t["logprob"] <= 0 for t in result["logprobs"])

    reply = chat.delay(ASK, model=MODEL, max_tokens=10, temperature=0.0, seed=1,
                       min_tokens=10).get(timeout=TIMEOUT)
    same = direct(server, "/chat/completions", {"messages": ASK, "max_tokens": 10,
                                                 "temperature": 0.0, "seed": 1,
                                                 "min_tokens": 10})
    assert reply["text"] == same["choices"][0]["message"]["content"]
    assert reply["prompt_tokens"] == same["usage"]["prompt_tokens"]


def test_tools_and_json_output_through_the_servers_parser(remote: WorkerProc) -> None:
    # Forced calls: JSON constrained to the arguments (the list of calls) by the server's
    # structured outputs, read back by the fleet as on its own engines.
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in (named, "required"):
        called = chat.delay(ASK, model=MODEL, tools=[WEATHER], tool_choice=choice,
                            max_tokens=60, temperature=0.0).get(timeout=TIMEOUT)
        assert called["finish_reason"] == "tool_calls" and called["text"] == ""
        [call] = called["tool_calls"][:1]
        assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
        arguments = json.loads(call["function"]["arguments"])
        Draft202012Validator(WEATHER["function"]["parameters"]).validate(arguments)

    schema = {"type": "object", "properties": {"verdict": {"enum": ["pass", "fail"]},
                                               "score": {"type": "integer", "minimum": 0,
                                                         "maximum": 10}},
              "required": ["verdict", "score"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "grade", "schema": schema}}
    for task, first in ((chat, ASK), (generate, "Grade this:")):
        graded = task.delay(first, model=MODEL, response_format=fmt,
                            max_tokens=60).get(timeout=TIMEOUT)
        assert graded["finish_reason"] == "stop"
        Draft202012Validator(schema).validate(graded["parsed"])

    # Offered with tool_choice auto: the server's hermes parser reads the text; what it leaves
    # as text is the reply (random weights rarely call).
    auto = chat.delay(ASK, model=MODEL, tools=[WEATHER], max_tokens=8,
                      temperature=0.0).get(timeout=TIMEOUT)
    assert auto["finish_reason"] in ("stop", "length", "tool_calls")


def test_the_servers_refusal_fails_only_its_own_task(remote: WorkerProc) -> None:
    bad = generate.delay("x", model=MODEL, max_tokens=4, allowed_token_ids=[999_999])
    long = generate.delay("word " * 600, model=MODEL, max_tokens=4)
    good = generate.delay("x", model=MODEL, max_tokens=4)
    with pytest.raises(InvalidRequest, match="allowed_token_ids"):
        bad.get(timeout=TIMEOUT)
    with pytest.raises(PromptTooLong, match="maximum context length"):
        long.get(timeout=TIMEOUT)
    assert good.get(timeout=TIMEOUT)["completion_tokens"] == 4


def test_streaming_deltas_come_from_the_servers_stream(remote: WorkerProc) -> None:
    from producer.client import stream_chat, stream_generate

    with stream_generate("Once upon a time", model=MODEL, max_tokens=16,
                         temperature=0.0) as text:
        pieces = list(text)
    whole = generate.delay("Once upon a time", model=MODEL, max_tokens=16,
                           temperature=0.0).get(timeout=TIMEOUT)
    assert len(pieces) > 1 and "".join(pieces) == text.completion.text == whole["text"]
    assert text.completion.completion_tokens == 16

    # Chat's deltas (``delta.content``), with min_tokens so the reply is as long as asked.
    with stream_chat(ASK, model=MODEL, max_tokens=12, min_tokens=12,
                     temperature=0.0) as reply:
        pieces = list(reply)
    whole = chat.delay(ASK, model=MODEL, max_tokens=12, min_tokens=12,
                       temperature=0.0).get(timeout=TIMEOUT)
    assert len(pieces) > 1 and "".join(pieces) == reply.completion.text == whole["text"]
    assert reply.completion.completion_tokens == 12


def test_revoke_cancels_the_request_at_the_server(remote: WorkerProc, server: VllmServer
                                                  ) -> None:
    handles = [generate.delay("Once upon", model=MODEL, max_tokens=480, ignore_eos=True)
               for _ in range(4)]
    wait_until(lambda: server.metric("vllm:num_requests_running") == 4, 60,
               "the server to run the four requests", 0.2)
    for handle in handles:
        handle.revoke()
    wait_until(lambda: server.metric("vllm:num_requests_running") == 0, 10,
               "the server to drop the revoked requests", 0.2)
    for handle in handles:
        with pytest.raises(TaskRevokedError):
            handle.get(timeout=TIMEOUT)


def test_a_remote_worker_is_small_and_holds_no_engine(remote: WorkerProc) -> None:
    worker = psutil.Process(remote.process.pid)
    assert not worker.children(recursive=True)
    maps = Path(f"/proc/{worker.pid}/maps").read_text()
    assert "libtorch" not in maps and "/vllm/" not in maps
    assert worker.memory_info().rss < 150 * 2**20, worker.memory_info().rss


SENDER = """
import json, sys, time
from producer import generate
ids = []
for i in range(240):
    ids.append(generate.delay(f"p {i}", model="tiny-mix", max_tokens=32, ignore_eos=True).id)
    print(len(ids), flush=True)
    time.sleep(0.025)
print(json.dumps(ids), flush=True)
"""


def test_server_stopped_and_restarted_loses_nothing(
    remote: WorkerProc, server: VllmServer, app: Any, redis_client: Any,
    fleet_env: dict[str, str]
) -> None:
    import subprocess
    import sys

    from celery.result import AsyncResult

    # An application sending a stream of tasks while the server goes away and comes back.
    sender = subprocess.Popen([sys.executable, "-c", SENDER], env=fleet_env,
                              stdout=subprocess.PIPE, text=True)
    assert sender.stdout is not None
    for line in sender.stdout:
        if int(line) >= 60:
            break
    server.stop()
    wait_until(lambda: not consumes(app, remote.node), 20, "the worker to stop consuming", 0.2)
    [engine] = list_engines(MODEL)
    assert engine["state"] == "unreachable" and server.base_url in engine["reason"]
    answer = health("r1")
    assert answer is not None and answer["ready"] is False
    out, _ = sender.communicate(timeout=60)
    ids = json.loads(out.splitlines()[-1])
    time.sleep(1.0)
    assert not consumes(app, remote.node)
    assert list_engines(MODEL)[0]["queue_depth"] > 0  # what was sent meanwhile waits queued

    server.start()
    wait_until(lambda: consumes(app, remote.node), 30, "the worker to consume again", 0.2)
    results = [result_of(AsyncResult(i, app=app), redis_client, TIMEOUT) for i in ids]
    assert len(results) == 240
    wrong = [r for r in results if r["completion_tokens"] != 32 or r["engine_id"] != "r1"]
    assert not wrong, wrong[:3]
    assert list_engines(MODEL)[0]["state"] == "ready"


def test_a_wrong_key_is_reported_and_nothing_is_consumed(
    fleet: Fleet, app: Any, server: VllmServer, remote: WorkerProc
) -> None:
    bad = fleet.start(MODEL, "r-badkey", env=remote_env(server, key="sk-wrong"))
    try:
        def reported() -> bool:
            mine = [e for e in list_engines(MODEL) if e["engine_id"] == "r-badkey"]
            return bool(mine) and mine[0]["state"] == "unreachable"

        wait_until(reported, 60, "the bad-key worker to report", 0.5)
        [engine] = [e for e in list_engines(MODEL) if e["engine_id"] == "r-badkey"]
        assert f"refused the key in {SERVER_KEY_ENV} (401)" in engine["reason"]
        assert not consumes(app, bad.node)
        answer = health("r-badkey")
        assert answer is not None and answer["ready"] is False
        assert "refused the key" in bad.log()
    finally:
        fleet.stop(bad)


def test_a_local_and_a_remote_engine_share_the_models_queue(
    fleet: Fleet, app: Any, remote: WorkerProc, redis_client: Any
) -> None:
    local = fleet.start(MODEL, "l1")  # the session's config: tiny-mix held in the worker
    try:
        fleet.wait_ready(app, local)
        engines = {e["engine_id"]: e["engine"] for e in list_engines(MODEL)}
        assert engines == {"r1": "openai", "l1": "vllm"}
        handles = [chat.delay([{"role": "user", "content": f"q {i}"}], model=MODEL,
                              max_tokens=16, ignore_eos=True) for i in range(400)]
        results = [result_of(h, redis_client, TIMEOUT) for h in handles]
        served = {r["engine_id"] for r in results}
        assert served == {"r1", "l1"}
        assert all(r["completion_tokens"] == 16 for r in results)
    finally:
        fleet.stop(local)
